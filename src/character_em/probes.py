"""The character direction on the base model: mean-difference directions and linear probes per layer.

Activations are the residual stream (hidden states) averaged over the assistant's tokens, for
answers that express a disposition (its character data) and answers that do not (the
correct-advice control of the same domain).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def read_chats(path: str | Path, limit: int) -> list[list[dict[str, str]]]:
    chats = []
    with open(path) as handle:
        for line in handle:
            if line.strip():
                chats.append(json.loads(line)["messages"])
            if len(chats) >= limit:
                break
    return chats


def response_activations(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, chats: Sequence[list[dict[str, str]]], layers: Sequence[int] | None
) -> np.ndarray:
    """Array [n_chats, n_layers, hidden]: hidden states after each chosen layer, averaged over the
    final assistant turn's tokens. Layer i means the output of block i (hidden_states[i + 1])."""
    import torch

    n_layers = model.config.num_hidden_layers
    chosen = list(range(n_layers)) if layers is None else list(layers)
    bad = [layer for layer in chosen if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"probe layers {bad} do not exist; the model has layers 0..{n_layers - 1}")
    out = np.zeros((len(chats), len(chosen), model.config.hidden_size), dtype=np.float32)
    model.eval()
    for index, chat in enumerate(chats):
        prompt_ids = tokenizer.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        full_ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
        start = len(prompt_ids)
        if full_ids[:start] != prompt_ids or start >= len(full_ids):
            raise ValueError("the chat template does not render the prompt as a prefix of the full chat; cannot find the response tokens")
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([full_ids], device=model.device), output_hidden_states=True).hidden_states
        for column, layer in enumerate(chosen):
            out[index, column] = hidden[layer + 1][0, start:].float().mean(dim=0).cpu().numpy()
    return out


def probe_layers(positive: np.ndarray, negative: np.ndarray, layers: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """Mean-difference direction and a held-out logistic-regression probe for each layer."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    features = np.concatenate([positive, negative])
    labels = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.3, random_state=seed, stratify=labels)
    results = []
    directions = np.zeros((len(layers), positive.shape[2]), dtype=np.float32)
    for column, layer in enumerate(layers):
        x = features[:, column]
        directions[column] = positive[:, column].mean(axis=0) - negative[:, column].mean(axis=0)
        probe = LogisticRegression(max_iter=2000).fit(x[train_idx], labels[train_idx])
        scores = probe.decision_function(x[test_idx])
        projection = x[test_idx] @ directions[column]
        results.append(
            {
                "layer": int(layer),
                "probe_accuracy": float(probe.score(x[test_idx], labels[test_idx])),
                "probe_auroc": float(roc_auc_score(labels[test_idx], scores)),
                "direction_auroc": float(roc_auc_score(labels[test_idx], projection)),
                "direction_norm": float(np.linalg.norm(directions[column])),
                "n_train": int(len(train_idx)),
                "n_test": int(len(test_idx)),
            }
        )
    return {"layers": results, "directions": directions}


def choose_layer(layer_results: list[dict[str, Any]], fixed: int | None) -> int:
    """The configured layer, or else the one with the best held-out probe AUROC."""
    if fixed is not None:
        return fixed
    return max(layer_results, key=lambda row: row["probe_auroc"])["layer"]
