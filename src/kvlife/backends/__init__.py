"""Where the benchmark's turns are computed: in this process, or by a serving engine over HTTP.

- `local` (base.LocalBackend): kvlife's own Session on a transformers model, with any recipe.
- `openai` (openai.OpenAIBackend): any OpenAI-compatible server (vLLM, SGLang, llama.cpp's
  llama-server, ...); multi-turn is a growing chat, multi-request separate requests sharing the
  context prefix, so the engine's own prefix cache decides what is reused.

The runner sees only the small interface in base.py: a `TurnBackend` opens sessions, and a session
answers `prefill(context)` / `ask(query)` with a `TurnResult`. llama_server.py starts a real
llama.cpp server on loopback for the tests and benchmarks. Importing the package loads nothing:
`loopback.free_port` and the servers need no torch.
"""
