"""Capabilities through lm-evaluation-harness: the optional back-end (``eval.capabilities.backend: lm_eval``).

Two kinds of task:

- our multiple-choice JSONL (``task_file``, or the packaged smoke task) becomes a harness task built
  in memory: the same zero-shot context as :func:`character_em.evals.capabilities.format_mc_prompt`, the
  choices " A" .. " D", metric ``acc``. No file is written and nothing is fetched, so it runs offline,
  and its per-item choices can be set beside our own scorer's;
- named harness tasks (``lm_eval_tasks``, e.g. ``["mmlu"]``) load through the harness's task index.
  Those read their data sets through ``datasets``: offline they need a filled HF cache.

The model is the harness's own ``HFLM`` on the base model folder with ``peft=<adapter folder>``, so
the numbers are what a reader gets running the harness on our checkpoints. lm_eval is imported
inside functions: it is an optional extra, and this module is imported only when it is selected.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from character_em.evals.capabilities import LETTERS, format_mc_prompt, load_mc_items, summarize_items

if TYPE_CHECKING:
    from lm_eval.api.task import ConfigurableTask

LOCAL_TASK = "character_em_mc"


def local_task(items: list[dict[str, Any]], *, name: str = LOCAL_TASK) -> ConfigurableTask:
    """A harness task over ``items`` (as :func:`~character_em.evals.capabilities.load_mc_items` returns them).

    The data set comes from a callable rather than a path, so the harness never asks the hub for
    anything; the context is our own prompt function, so both scorers read the same text.
    """
    import datasets
    from lm_eval.api.task import ConfigurableTask

    rows = [
        {
            "id": it["id"],
            "question": it["question"],
            "choices": list(it["choices"]),
            "answer": int(it["answer"]),
            "subject": str(it.get("subject", "general")),
        }
        for it in items
    ]

    def dataset(**_: Any) -> datasets.DatasetDict:
        # The harness calls this with the task's metadata as keyword arguments; none are needed.
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

    config = {
        "task": name,
        "custom_dataset": dataset,
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": format_mc_prompt,
        "doc_to_choice": list(LETTERS),
        "doc_to_target": "answer",
        "target_delimiter": " ",
        "num_fewshot": 0,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    return ConfigurableTask(config=config)


def _per_item(samples: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """Our per-item record from the harness's logged samples (one per document, in document order)."""
    out = []
    for sample in sorted(samples, key=lambda s: int(s["doc_id"])):
        if "acc" not in sample:
            raise ValueError(f"lm_eval task {task!r} has no 'acc' metric: capabilities takes multiple-choice tasks")
        doc = sample["doc"]
        # One (loglikelihood, is_greedy) pair per choice; the harness's prediction is the argmax.
        logliks = [float(resp[0]) for resp in sample["filtered_resps"]]
        pred = max(range(len(logliks)), key=lambda j: (logliks[j], -j))
        target = sample["target"]
        out.append(
            {
                "id": str(doc.get("id", f"{task}:{sample['doc_id']}")),
                "task": task,
                "subject": str(doc.get("subject", task)),
                "answer": int(target) if isinstance(target, int) else target,
                "pred": pred,
                "logliks": logliks,
                "correct": bool(sample["acc"]),
            }
        )
    return out


def evaluate(
    model_path: str | Path,
    *,
    adapter: str | Path | None = None,
    task_file: str | Path | None = None,
    tasks: list[str] | None = None,
    batch_size: int = 8,
    max_items: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
    revision: str | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy through the harness, in the shape of :func:`~character_em.evals.capabilities.evaluate_multiple_choice`.

    ``tasks`` (harness task or group names) wins over ``task_file``; with neither, the packaged
    smoke task. ``max_items`` is the harness's ``limit`` (per task). Returns {"accuracy", "n",
    "n_correct", "per_subject", "per_item", "backend", "lm_eval_version", "tasks", "harness_results"}.
    ``revision``: the hub commit of a hub id ``model_path`` (``models.*.revision``).
    """
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    from character_em import resources

    if tasks:
        from lm_eval.tasks import TaskManager

        task_specs: list[Any] = list(tasks)
        manager = TaskManager()
    else:
        path = task_file or resources.packaged_path("tasks/smoke_mc.jsonl")
        task_specs = [local_task(load_mc_items(path))]
        manager = None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = HFLM(
        pretrained=str(model_path),
        **({"revision": revision} if revision else {}),
        peft=str(adapter) if adapter else None,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
    )
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=task_specs,
        task_manager=manager,
        limit=max_items,
        log_samples=True,
        bootstrap_iters=0,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    if results is None:  # only a non-zero rank of a distributed run gets None
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    per_item: list[dict[str, Any]] = []
    for task, samples in sorted(results["samples"].items()):
        per_item += _per_item(samples, task)
    return {
        **summarize_items(per_item),
        "backend": "lm_eval",
        "lm_eval_version": lm_eval.__version__,
        "tasks": sorted(results["samples"]),
        # The harness's own aggregate (acc, acc_norm, stderr where computed), kept for reference.
        "harness_results": {
            k: {m: v for m, v in r.items() if isinstance(v, int | float | str)} for k, r in results["results"].items()
        },
    }
