"""An ImageFolder layout (torchvision's): one sub-folder per class, images inside.

    root/golden_retriever/0001.jpg
    root/golden_retriever/more/0002.png      # nested folders belong to their top class
    root/tabby_cat/0003.JPEG

Classes are the sub-folders in sorted order (label = position); the class NAME is the
folder name with '_' read as a space ("golden retriever"), ready for prompt templates.
Files whose extension is not an image's (a README, a .DS_Store) are left out.

Records: `image` the file's encoded bytes (decoded by a transform), `label` int, `id` the
path relative to root. The file list is read once at construction, so a missing root, a
root without class folders or without images fails there, in one line.
"""

from __future__ import annotations

import os

import numpy as np

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')


def class_name(folder: str) -> str:
    return folder.replace('_', ' ')


class ImageFolder:
    """Random-access records of root/<class>/<image>; see the module doc."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise ValueError(f"image folder: no such directory '{root}'")
        self.root = root
        self.classes = tuple(
            sorted(
                d
                for d in os.listdir(root)
                if os.path.isdir(os.path.join(root, d)) and not d.startswith('.')
            )
        )
        if not self.classes:
            raise ValueError(f"image folder '{root}' has no class sub-folders")
        self.classnames = tuple(class_name(c) for c in self.classes)
        paths, labels = [], []
        for label, folder in enumerate(self.classes):
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
                dirnames.sort()  # os.walk visits them in this order: a stable record order
                for fname in sorted(filenames):
                    if os.path.splitext(fname)[1].lower() in IMAGE_EXTENSIONS:
                        paths.append(os.path.join(dirpath, fname))
                        labels.append(label)
        if not paths:
            raise ValueError(
                f"image folder '{root}' has no images ({', '.join(IMAGE_EXTENSIONS)}) in its "
                f'{len(self.classes)} class folders'
            )
        self.paths = paths
        self.labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        with open(path, 'rb') as f:
            image = f.read()
        return {
            'image': image,
            'label': int(self.labels[index]),
            'id': os.path.relpath(path, self.root),
        }
