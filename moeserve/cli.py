"""The `moeserve` command line."""

# `generate` and `serve` are defined here; the other commands come from the parts that own them: `make-tiny` from
# moeserve.tiny, `train`, `adapters` and `esft` from moeserve.training, `demo` and `eval` from moeserve.demo.

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def default_model_dir() -> Path:
    """The built-in default model: the small pretrained MoE shipped with the package (docs/base_model.md),
    pretrained once into the cache by an install that does not ship it."""
    from moeserve.demo.pretraining.ensure import ensure_builtin_model

    return ensure_builtin_model()


def _adapter_pairs(values: list[str] | None) -> dict[str, Path]:
    pairs: dict[str, Path] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter takes NAME=DIR, got {value!r}")
        if name in pairs:
            raise ValueError(f"--adapter {name!r} is given twice")
        pairs[name] = Path(path)
    return pairs


def _generate(args: argparse.Namespace) -> int:
    from moeserve.engine import LLM, SamplingParams
    from moeserve.engine.arg_utils import engine_config_from_args

    model = args.model or default_model_dir()
    llm = LLM.from_engine_config(engine_config_from_args(str(model), args), _adapter_pairs(args.adapter))
    params = SamplingParams(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.sampling_seed,
        max_tokens=args.max_tokens,
        stop=args.stop or [],
        ignore_eos=args.ignore_eos,
    )
    prompts = args.prompt or ["The Python language"]
    if args.chat:
        prompts = [
            llm.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    for out in llm.generate(prompts, params, use_tqdm=True, adapter=args.use_adapter):
        for completion in out.outputs:
            print(f"--- prompt: {out.prompt!r} [{completion.index}] finish={completion.finish_reason}")
            print(completion.text)
    return 0


def _json_list(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError("expected a JSON list of strings, e.g. '[\"*\"]'")
    return value


def _serve(args: argparse.Namespace) -> int:
    from moeserve.engine.arg_utils import engine_config_from_args
    from moeserve.server.app import ServerConfig
    from moeserve.server.launch import build_server, serve

    model = args.model or default_model_dir()
    adapters = _adapter_pairs(args.adapter)
    config = ServerConfig(
        served_model_name=args.served_model_name or Path(model).name,
        model_path=str(model),
        api_key=args.api_key,
        enable_adapter_loading=args.enable_adapter_loading,
        allowed_adapter_dirs=list(args.allowed_adapter_dir),
        shutdown_timeout=args.shutdown_timeout,
        **({} if args.engine_stall_timeout is None else {"engine_stall_timeout": args.engine_stall_timeout}),
        allowed_origins=args.allowed_origins,
        allowed_methods=args.allowed_methods,
        allowed_headers=args.allowed_headers,
        allow_credentials=args.allow_credentials,
        tool_call_parser=args.tool_call_parser,
    )
    engine_config = engine_config_from_args(str(model), args)
    if args.replicas is not None:
        from moeserve.deploy.ray_config import RayServeConfig
        from moeserve.deploy.ray_serve import serve_replicas

        ray_config = RayServeConfig(
            num_replicas=args.replicas,
            replica_cpus=args.replica_cpus,
            replica_gpus=args.replica_gpus,
            ray_address=args.ray_address,
        )
        serve_replicas(engine_config, config, adapters, ray_config, args.host, args.port, args.max_waiting)
        return 0
    app = build_server(engine_config, config, adapters, args.max_waiting)
    serve(app, args.host, args.port, args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from moeserve.engine.arg_utils import add_engine_args
    from moeserve.server.tool_parser import TOOL_PARSERS
    from moeserve.tiny.cli import add_tiny_commands

    parser = argparse.ArgumentParser(prog="moeserve", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    add_tiny_commands(sub)

    gen = sub.add_parser("generate", help="generate text offline with the engine (batched, paged KV cache)")
    gen.add_argument("--model", type=Path, help="Hugging Face model directory (default: the built-in small MoE)")
    gen.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--n", type=int, default=1, help="completions per prompt")
    gen.add_argument("--stop", action="append", help="stop string; repeatable")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--sampling-seed", type=int, default=None, help="per-request seed (reproducible sampling)")
    gen.add_argument("--adapter", action="append", metavar="NAME=DIR", help="register an adapter; repeatable")
    gen.add_argument("--use-adapter", metavar="NAME", help="generate with this registered adapter")
    add_engine_args(gen)
    gen.set_defaults(func=_generate)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server for the base model and its adapters")
    srv.add_argument("--model", type=Path, help="Hugging Face model directory (default: the built-in small MoE)")
    srv.add_argument("--served-model-name", help="the base model's name in the API (default: the directory name)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--adapter", action="append", metavar="NAME=DIR", help="serve this adapter; repeatable")
    srv.add_argument(
        "--enable-adapter-loading",
        action="store_true",
        help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter",
    )
    srv.add_argument(
        "--allowed-adapter-dir",
        action="append",
        type=Path,
        default=[],
        help="directory adapters may be loaded from over HTTP; repeatable",
    )
    srv.add_argument(
        "--api-key",
        default=os.environ.get("MOESERVE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 routes (or MOESERVE_API_KEY)",
    )
    srv.add_argument("--max-waiting", type=int, default=None, help="refuse requests (429) beyond this many waiting")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds running requests get on shutdown")
    srv.add_argument(
        "--engine-stall-timeout",
        type=float,
        default=None,
        help="seconds the engine core may make no progress with work to do before it is restarted (its requests: "
        "503; default: ServerConfig's, 300)",
    )
    for flag, what in (("origins", "origins"), ("methods", "HTTP methods"), ("headers", "request headers")):
        srv.add_argument(
            f"--allowed-{flag}",
            type=_json_list,
            default=["*"],
            help=f"CORS: allowed {what}, a JSON list as vLLM takes it (default: '[\"*\"]')",
        )
    srv.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    srv.add_argument(
        "--tool-call-parser",
        choices=sorted(TOOL_PARSERS),
        default=None,
        help='parse tool calls out of chat answers (needed for tool_choice "auto"; "required" and named always work)',
    )
    ray = srv.add_argument_group("many replicas (Ray Serve, docs/deploy.md)")
    ray.add_argument("--replicas", type=int, default=None, help="run N engine replicas behind Ray Serve's proxy")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs reserved per engine replica")
    ray.add_argument("--replica-gpus", type=float, default=0.0, help="Ray GPUs per replica (default: 1 on cuda)")
    ray.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start one here)")
    add_engine_args(srv)
    srv.set_defaults(func=_serve)

    from moeserve.demo.cli import add_demo_commands
    from moeserve.training.cli import add_train_commands
    from moeserve.training.esft.cli import add_esft_commands

    add_train_commands(sub)
    add_esft_commands(sub)
    add_demo_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Under torchrun every rank runs this; only rank 0 tells the story (the others still warn).
    level = args.log_level if os.environ.get("RANK", "0") == "0" else "WARNING"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except Exception as exc:  # bad input (a model or adapter the engine core refused at start): say what, no traceback
        from moeserve.engine.core_process import CoreStartError

        if not isinstance(exc, (ValueError, OSError, CoreStartError)):
            raise
        print(f"moeserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
