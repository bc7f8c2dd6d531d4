"""Rebuild the bundled demo data set from Debian's Fashion-MNIST (MIT licence).

270 "Sneaker" images from the test split are the normal class; 30 images of the other nine
classes (10%) are planted as contamination. Normals go to ``good/`` and contaminants to
``other/``: Refinery reads that layout as labels, which it uses for display and metrics only.

    python assets/make_demo.py   # needs: apt-get install -y dataset-fashion-mnist
"""
from pathlib import Path

import numpy as np

from core.data import FASHION_MNIST_CLASSES, load_fashion_mnist, materialize_images

DEMO_DIR = Path(__file__).resolve().parent / "demo" / "fashion-mnist-sneakers"
NORMAL_CLASS = FASHION_MNIST_CLASSES.index("Sneaker")
N_NORMAL, N_CONTAMINATION, SEED = 270, 30, 0


def main() -> None:
    images, classes = load_fashion_mnist("test")
    rng = np.random.default_rng(SEED)
    normal = rng.choice(np.flatnonzero(classes == NORMAL_CLASS), N_NORMAL, replace=False)
    other = rng.choice(np.flatnonzero(classes != NORMAL_CLASS), N_CONTAMINATION, replace=False)
    ids = [f"good/{i:05d}.png" for i in normal] + [
        f"other/{FASHION_MNIST_CLASSES[classes[i]].split('/')[0].lower().replace(' ', '-')}-{i:05d}.png" for i in other
    ]
    materialize_images(images[np.r_[normal, other]], ids, DEMO_DIR)
    print(f"wrote {len(ids)} images to {DEMO_DIR}")


if __name__ == "__main__":
    main()
