"""The ``rectiflow data`` command's arguments and handler (light to import: the importer, Pillow
and pyarrow load only when the command runs)."""

from __future__ import annotations

import argparse
import sys


def positive_int(text: str) -> int:
    """argparse type: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``rectiflow data import``."""
    parser.add_argument(
        "src",
        metavar="SRC",
        help="a folder of PNG/JPEG images (class subfolders allowed), a .zip of them, "
        "a uint8 .npz/.npy array (N,H,W), (N,H,W,C) or (N,C,H,W), or sklearn:digits",
    )
    parser.add_argument(
        "dst", metavar="DST_URI", help="where the Parquet shards and _SUCCESS.json go (path or fsspec URI)"
    )
    parser.add_argument(
        "--resolution",
        type=positive_int,
        required=True,
        metavar="R",
        help="output size: shorter side resized to R, then center-cropped to R×R",
    )
    parser.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=None,
        help="1 (grey, L) or 3 (RGB); default: 1 for single-channel arrays, else 3",
    )
    parser.add_argument(
        "--shard-size",
        type=positive_int,
        default=1000,
        metavar="S",
        help="images per shard (shard s covers source positions [s·S, (s+1)·S)); default 1000",
    )
    parser.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="leave out unreadable images (listed in the manifest) instead of failing",
    )
    parser.add_argument(
        "--encoding",
        choices=("png", "raw"),
        default="png",
        help="png (small, costs CPU to decode) or raw uint8 pixels (C·R·R bytes an image before "
        "compression, no decoding); default png",
    )
    parser.add_argument(
        "--ray",
        action="store_true",
        help="encode shards on Ray actors (joins --address / RAY_ADDRESS, else starts a local Ray)",
    )
    parser.add_argument("--address", help="Ray address to join with --ray")


def data_command(args: argparse.Namespace) -> int:
    """Run ``rectiflow data …``; 0 done, 1 an unreadable image, 2 bad settings or source."""
    from workflows.images.format import CorruptImageError, ImageImportError
    from workflows.images.importer import import_images
    from workflows.storage import location

    if args.ray:
        from workflows.commands import connect_ray

        connect_ray(args.address)
    try:
        manifest = import_images(
            args.src,
            args.dst,
            resolution=args.resolution,
            channels=args.channels,
            shard_size=args.shard_size,
            skip_corrupt=args.skip_corrupt,
            encoding=args.encoding,
        )
    except CorruptImageError as error:
        print(f"rectiflow data import: {error}", file=sys.stderr)
        return 1
    except ImageImportError as error:
        print(f"rectiflow data import: {error}", file=sys.stderr)
        return 2
    details = manifest.details
    print(
        f"{details['count']} images ({details['skipped_count']} skipped) of shape "
        f"{'x'.join(map(str, details['shape']))}, {details['encoding']}, in {len(details['shards'])} shards at "
        f"{location(args.dst).uri}"
    )
    return 0
