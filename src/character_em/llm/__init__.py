"""Models and model calls shared by every stage: loading (4-bit, adapters), chat rendering and end-of-turn tokens, the OpenAI-compatible client, the content-addressed cache, tiny test models, and hub models fetched at their revisions."""

from character_em.lazy import lazy_exports

_EXPORTS = {
    "load_model": "loading",
    "forward_cache_kwarg": "loading",
    "load_tokenizer": "loading",
    "disable_bnb_cpu_repacking": "loading",
    "END_OF_TURN_TOKENS": "chat",
    "end_of_turn_ids": "chat",
    "stop_token_ids": "chat",
    "render_prompt": "chat",
    "ChatClient": "client",
    "CallFailure": "client",
    "MissingCredentialError": "client",
    "ReplyMalformed": "client",
    "ReplyRejected": "client",
    "RequestRejected": "client",
    "ContentCache": "cache",
    "content_key": "cache",
    "build_tiny_model": "tiny",
    "planned_config": "tiny",
    "hub_models": "hub",
    "prefetch": "hub",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
