"""``flashtts serve``: start the HTTP server (one process, one model)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from flashtts_core.cli.options import add_model_options, fail, settings_kwargs, setup_logging

__all__ = ("add_parser", "run")

logger = logging.getLogger(__name__)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="start the HTTP server")
    add_model_options(p)
    p.add_argument(
        "--demo",
        nargs="?",
        const="spark",
        default=None,
        metavar="FAMILY",
        help="serve a tiny random-weight checkpoint of FAMILY (default spark) to try the server: it speaks noise",
    )
    g = p.add_argument_group("server")
    g.add_argument("--model_name", default=None, help="model id of /v1/models (default: the engine family)")
    g.add_argument("--role_dir", default=None, help="voice folder (spark: data/roles, mega: data/mega-roles)")
    g.add_argument("--db_path", default=None, help="accepted for compatibility; voices are stored in --role_dir")
    g.add_argument("--state_dir", default=None, help="folder for small server state (pinned --fix_voice timbres)")
    g.add_argument("--api_key", default=None, help="require 'Authorization: Bearer KEY' on API routes")
    g.add_argument("--fix_voice", action="store_true", help="keep the first timbre of spark female/male")
    g.add_argument("--host", default="0.0.0.0")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--ssl_keyfile", default=None)
    g.add_argument("--ssl_certfile", default=None)
    g.add_argument("--cors_origins", default=None, help="comma-separated origins allowed by CORS (off by default)")
    g.add_argument("--no_warmup", action="store_true", help="skip the warm-up synthesis at start-up")
    g.add_argument("--log_level", default="info", choices=("debug", "info", "warning", "error"))
    lim = p.add_argument_group("limits")
    lim.add_argument("--max_text_chars", type=int, default=4096, help="longest accepted input text")
    lim.add_argument("--max_upload_bytes", type=int, default=20 * 1024 * 1024, help="largest accepted upload")
    lim.add_argument("--allow_private_urls", action="store_true", help="allow reference URLs on private networks")
    lim.add_argument("--max_queue", type=int, default=64, help="requests in progress beyond which 503 is returned")
    lim.add_argument(
        "--max_segments",
        type=int,
        default=256,
        help="most LLM generations (text segments, all dialogue turns together) one request may need",
    )
    lim.add_argument(
        "--request_timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="time budget of one synthesis: 504 before the audio starts, a clean end of the stream after (off)",
    )
    lim.add_argument("--url_timeout", type=float, default=10.0, help="timeout of reference-audio URL downloads (s)")
    g.add_argument(
        "--metrics_public",
        action="store_true",
        help="serve /metrics without the API key (by default it needs the key when --api_key is set)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import msgspec

    from flashtts_core.config import ServerSettings
    from flashtts_core.errors import FlashTTSError
    from flashtts_core.runtime import limit_malloc_arenas

    limit_malloc_arenas()  # before any thread allocates (see there)
    setup_logging(args.log_level)
    try:
        settings = msgspec.convert(
            dict(
                settings_kwargs(args),
                demo=args.demo,
                model_name=args.model_name,
                role_dir=args.role_dir,
                db_path=args.db_path,
                state_dir=args.state_dir,
                api_key=args.api_key,
                fix_voice=args.fix_voice,
                host=args.host,
                port=args.port,
                ssl_keyfile=args.ssl_keyfile,
                ssl_certfile=args.ssl_certfile,
                cors_origins=tuple(o.strip() for o in (args.cors_origins or "").split(",") if o.strip()),
                warmup=not args.no_warmup,
                max_text_chars=args.max_text_chars,
                max_upload_bytes=args.max_upload_bytes,
                allow_private_urls=args.allow_private_urls,
                max_queue=args.max_queue,
                max_segments=args.max_segments,
                request_timeout=args.request_timeout,
                url_timeout=args.url_timeout,
                metrics_public=args.metrics_public,
            ),
            ServerSettings,
        )
    except msgspec.ValidationError as exc:
        fail(str(exc))
    if settings.demo is not None:
        logger.warning(
            "DEMO MODE: serving a tiny %s checkpoint with RANDOM weights — every voice is noise. "
            "Point --model_path at a real download to hear speech.",
            settings.demo,
        )
    from flashtts_core.runtime import resolve

    try:
        plan = resolve(settings)
    except FlashTTSError as exc:
        fail(exc.message)

    import uvicorn

    from flashtts_core.server import create_app

    app = create_app(settings, plan=plan)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        ssl_keyfile=settings.ssl_keyfile,
        ssl_certfile=settings.ssl_certfile,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
    )
    return 0
