"""Write the built-in ``granite`` set into a folder, for ``refinery fit`` on the command line.

240 granite tiles (128 x 128 colour) are rendered from the seed by ``core.data.textures``: 216
defect-free tiles (``good/``) and 24 tiles (10%) with one scratch, crack, stain or chip
(``other/<kind>-<n>.png``), each with its pixel mask beside it (``other/<kind>-<n>_mask.png``).
The studio prepares the same set itself (Data page, built-in sets); this script only puts it where
the command line can read it, and prints the folder to pass to ``refinery fit``:

    python assets/make_textures.py WORKSPACE [--seed N]
    refinery fit WORKSPACE/builtin/granite-0 --out RUN_DIR
"""
import argparse
from pathlib import Path

from core.data.builtin import prepare_builtin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace", type=Path, help="the set is written into WORKSPACE/builtin/granite-SEED")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same tiles (default: %(default)s)")
    args = parser.parse_args()
    print(prepare_builtin("granite", args.workspace, seed=args.seed))


if __name__ == "__main__":
    main()
