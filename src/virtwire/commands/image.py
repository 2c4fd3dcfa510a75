"""``virtwire image``: build the default guest image, or print where it is."""

from __future__ import annotations

import argparse
import json
import sys

from virtwire.guest import image

NAME = "image"
HELP = "build the default guest image (Debian kernel + busybox initramfs) or show its paths"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="image_command", metavar="ACTION")
    b = sub.add_parser("build", help="build the image, or reuse the cached one for these versions")
    b.add_argument("--rebuild", action="store_true",
                   help="repack from the cached packages even if the image exists")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p = sub.add_parser("path", help="print the kernel and initramfs paths")
    p.add_argument("--json", action="store_true", help="print as JSON")


def run(args: argparse.Namespace) -> int:
    if args.image_command == "build":
        progress = None if args.quiet else image.stderr_progress
        result = image.build_image(rebuild=args.rebuild, progress=progress)
        if args.json:
            print(json.dumps(result, indent=2, sort_keys=True))
        elif not args.quiet:
            print(result["kernel"])
            print(result["initramfs"])
        return 0
    if args.image_command == "path":
        img = image.load_image()
        if args.json:
            print(json.dumps(img.to_json(), indent=2, sort_keys=True))
        else:
            print(f"kernel    {img.kernel}")
            print(f"initramfs {img.initramfs}")
        return 0
    sys.stderr.write("usage: virtwire image {build,path} [--json]\n")
    return 2
