"""``parauni serve``: the local web app."""

from __future__ import annotations

import argparse

from ..serve import SETTING_FLAGS, SETTING_HELP, ServeSettings
from .common import OVERRIDE_HELP


def cmd_serve(args: argparse.Namespace, overrides: list[str]) -> int:
    from ..serve import build_app, launch, load_served  # gradio and torch: only when serving

    settings = ServeSettings(**{field: getattr(args, field) for field in SETTING_FLAGS})
    served = load_served(args.model or [], overrides, args.demo_dir)
    print(f"serving {', '.join(served.models)} on http://{settings.host}:{settings.port} (Ctrl+C stops)")
    launch(build_app(served, settings), settings)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this family's commands on the ``parauni`` sub-command parser."""
    p = sub.add_parser(
        "serve",
        help="a local web app: text-to-image, image-to-image, last layer vs all layers",
        epilog=OVERRIDE_HELP + " (applied to every served model)",
    )
    add_serve_arguments(p)
    p.set_defaults(fn=cmd_serve)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``parauni serve`` flags: the models, then one flag per :class:`ServeSettings` field."""
    parser.add_argument(
        "--model",
        action="append",
        help="a model folder or preset, optionally named as NAME=DIR (repeat to serve several; the first is "
        "the default). Without --model: the models parauni demo trained in --demo-dir",
    )
    parser.add_argument(
        "--demo-dir", default="parauni-demo", help="parauni demo's report folder (default: parauni-demo)"
    )
    defaults = ServeSettings()
    for name in SETTING_FLAGS:
        default = getattr(defaults, name)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=type(default),
            default=default,
            help=f"{SETTING_HELP[name]} (default: {default})",
        )
