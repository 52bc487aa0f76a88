"""CelebA: 40 binary face attributes (40 classification tasks) on aligned face images.

Expected files (the official layout, or everything in one folder):

* ``list_attr_celeba.txt`` (also looked for in ``Anno/``): line 1 the number of
  images, line 2 the 40 attribute names, then one line per image:
  ``000001.jpg -1 1 1 -1 ...`` with values -1 / 1.
* ``list_eval_partition.txt`` (also looked for in ``Eval/``): ``000001.jpg 0`` with
  0 train, 1 validation, 2 test.
* ``img_align_celeba/`` with the aligned 178 x 218 JPEGs (a doubly nested
  ``img_align_celeba/img_align_celeba/``, as some archives unpack, is found too).

Attributes are returned as {0, 1} int32 (1 where the file says 1). Images are
center-cropped to the largest square (178 x 178 for the aligned images: rows 20..197)
and resized with PIL's bilinear filter (antialiased) to 64 x 64, then scaled to
float32 [0, 1] with shape (N, 64, 64, 3). CelebA has 202,599 images, so
:func:`celeba_split` reads only the annotation files and loads images on demand:
``split.load_images(indices)`` or ``split.batches(...)`` per mini-batch;
:func:`load_celeba` loads a whole (optionally truncated) split at once.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from mtsgd_jax.data._common import DataFormatError, find_first, missing_file_error
from mtsgd_jax.data.batches import epoch_permutation, num_batches

__all__ = [
    "CELEBA_ATTRIBUTES",
    "CELEBA_PARTITIONS",
    "CelebASplit",
    "CelebAData",
    "read_celeba_attributes",
    "read_celeba_partition",
    "load_celeba_image",
    "celeba_split",
    "load_celeba",
]

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
    "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
    "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
CELEBA_PARTITIONS = {"train": 0, "valid": 1, "test": 2}
_ATTR_FILE, _PART_FILE, _IMG_DIR = "list_attr_celeba.txt", "list_eval_partition.txt", "img_align_celeba"


def _lines(path: Path) -> list[str]:
    try:
        # utf-8-sig: a byte-order mark some editors add would otherwise spoil the count on line 1.
        with open(path, encoding="utf-8-sig") as f:
            return f.read().splitlines()
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not a text file ({e}).") from None


def read_celeba_attributes(path: str | os.PathLike) -> tuple[list[str], np.ndarray, list[str]]:
    """Parse ``list_attr_celeba.txt``.

    Returns:
      (image_ids, attributes, names): N image file names, (N, A) int32 in {0, 1}
      (-1 -> 0, 1 -> 1) and the A attribute names of line 2 (A = 40 for CelebA).

    Raises DataFormatError naming the file, the line and what was expected for a bad
    count line, a header line that holds values instead of names or repeats a name, a
    line with the wrong number of fields or a value other than -1 / 1, an image id that
    is not a plain file name, a duplicate image id, or a count that differs from the
    number of lines, or no image at all. Blank lines and a leading byte-order mark are ignored.

    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = pathlib.Path(d) / "list_attr_celeba.txt"
    ...     _ = p.write_text("2\\nSmiling Male \\n000001.jpg  1 -1\\n000002.jpg -1  1\\n")
    ...     ids, attrs, names = read_celeba_attributes(p)
    >>> ids, attrs.tolist(), names
    (['000001.jpg', '000002.jpg'], [[1, 0], [0, 1]], ['Smiling', 'Male'])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected CelebA's attribute list {_ATTR_FILE}).")
    lines = _lines(path)
    if len(lines) < 2:
        raise DataFormatError(
            f"{path}: {len(lines)} line(s); expected the image count on line 1, the attribute names on line 2, "
            "then one line 'image_id v1 ... vA' per image."
        )
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise DataFormatError(f"{path}, line 1: expected the number of images (an integer), got {lines[0]!r}.") from None
    names = lines[1].split()
    if not names or any(n.lstrip("+-").isdigit() for n in names) or names[0].lower().endswith((".jpg", ".png")):
        raise DataFormatError(
            f"{path}, line 2: expected the attribute names (e.g. '5_o_Clock_Shadow Arched_Eyebrows ...'), "
            f"got {lines[1][:80]!r}."
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataFormatError(f"{path}, line 2: attribute name(s) {repeated} appear more than once; expected distinct names.")
    a = len(names)
    ids: list[str] = []
    rows: list[list[str]] = []
    for lineno, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != a + 1:
            raise DataFormatError(
                f"{path}, line {lineno}: expected an image id and {a} values (-1 or 1), got {len(fields)} fields: "
                f"{line[:80]!r}."
            )
        _check_image_id(path, lineno, fields[0])
        rows.append(fields[1:])
        ids.append(fields[0])
    if not ids:
        raise DataFormatError(
            f"{path}: lists no images; expected one line 'image_id v1 ... v{a}' per image after the names line."
        )
    values = np.array(rows, dtype=str).reshape(len(rows), a)
    is_pos, is_neg = values == "1", values == "-1"
    bad = ~(is_pos | is_neg)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        lineno = _data_line_numbers(lines)[r]
        raise DataFormatError(
            f"{path}, line {lineno}: value {str(values[r, c])!r} for attribute {names[c]!r} of {ids[r]}; expected -1 or 1."
        )
    if len(set(ids)) != len(ids):
        seen = set()
        for r, i in enumerate(ids):
            if i in seen:
                raise DataFormatError(f"{path}, line {_data_line_numbers(lines)[r]}: duplicate image id {i!r}.")
            seen.add(i)
    if count != len(ids):
        raise DataFormatError(f"{path}, line 1: declares {count} images but the file lists {len(ids)}.")
    return ids, is_pos.astype(np.int32), names


def _check_image_id(path: Path, lineno: int, image_id: str) -> None:
    """An image id must be a plain file name inside the image folder (no folder part, not '.' or '..')."""
    if image_id in (".", "..") or "/" in image_id or "\\" in image_id:
        raise DataFormatError(
            f"{path}, line {lineno}: image id {image_id!r} is not a file name; expected a name such as "
            f"'000001.jpg' of an image in {_IMG_DIR}/."
        )


def _data_line_numbers(lines: list[str], start: int = 2) -> list[int]:
    """1-based line numbers of the non-blank lines from ``start`` (0-based) on."""
    return [i + 1 for i in range(start, len(lines)) if lines[i].strip()]


def read_celeba_partition(path: str | os.PathLike) -> dict[str, int]:
    """Parse ``list_eval_partition.txt`` into ``{image_id: partition}`` (0 train, 1 valid, 2 test).

    Raises DataFormatError naming the file and line for a line that is not
    ``image_id partition`` with partition 0, 1 or 2, an image id that is not a plain
    file name, or a duplicate image id.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected CelebA's partition list {_PART_FILE}).")
    out: dict[str, int] = {}
    for lineno, line in enumerate(_lines(path), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataFormatError(
                f"{path}, line {lineno}: expected 'image_id partition' with partition 0 (train), 1 (valid) "
                f"or 2 (test), got {line[:80]!r}."
            )
        _check_image_id(path, lineno, fields[0])
        if fields[0] in out:
            raise DataFormatError(f"{path}, line {lineno}: duplicate image id {fields[0]!r}.")
        out[fields[0]] = int(fields[1])
    return out


def load_celeba_image(path: str | os.PathLike, image_size: int = 64, center_crop: bool = True) -> np.ndarray:
    """One image as (image_size, image_size, 3) float32 in [0, 1].

    RGB conversion, then (if ``center_crop``) a crop to the centred largest square,
    then a bilinear (antialiased) resize with PIL.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CelebA image {path} does not exist (expected an aligned JPEG in {_IMG_DIR}/).")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DataFormatError(f"{path}: not a readable image ({e}).") from None
    if center_crop:
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
    im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.float32) / np.float32(255.0)


class CelebAData(NamedTuple):
    """A loaded CelebA split.

    Attributes:
      images: (N, S, S, 3) float32 in [0, 1] (S = 64 by default), or None if not loaded.
      attributes: (N, A) int32 in {0, 1}.
      attribute_names: the A names.
      image_ids: the N file names.
    """

    images: np.ndarray | None
    attributes: np.ndarray
    attribute_names: list[str]
    image_ids: list[str]


class CelebASplit:
    """One CelebA split with lazily loaded images (see :func:`celeba_split`).

    Attributes:
      image_ids: list of N file names; ``attributes`` (N, A) int32 {0, 1};
      ``attribute_names`` list of A names; ``image_dir`` the folder of the JPEGs.
    """

    def __init__(self, image_dir, image_ids, attributes, attribute_names, image_size=64, center_crop=True, num_threads=0):
        self.image_dir = Path(image_dir)
        self.image_ids = list(image_ids)
        self.attributes = attributes
        self.attribute_names = list(attribute_names)
        self.image_size = image_size
        self.center_crop = center_crop
        self.num_threads = num_threads

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        return f"CelebASplit(n={len(self)}, attributes={len(self.attribute_names)}, image_dir={str(self.image_dir)!r})"

    def load_images(self, indices=None) -> np.ndarray:
        """Images of the given rows (default all) as (n, S, S, 3) float32 in [0, 1]."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"image indices must lie in [0, {len(self)}), got min {idx.min()}, max {idx.max()}.")
        paths = [self.image_dir / self.image_ids[i] for i in idx]
        load = lambda p: load_celeba_image(p, self.image_size, self.center_crop)  # noqa: E731
        if self.num_threads and self.num_threads > 1 and len(paths) > 1:
            with ThreadPoolExecutor(self.num_threads) as ex:
                imgs = list(ex.map(load, paths))
        else:
            imgs = [load(p) for p in paths]
        if not imgs:
            return np.zeros((0, self.image_size, self.image_size, 3), np.float32)
        return np.stack(imgs)

    def __getitem__(self, indices) -> dict:
        """``{"images": (n, S, S, 3), "attributes": (n, A)}`` for an index array, list or slice."""
        if isinstance(indices, slice):
            indices = np.arange(len(self))[indices]
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return {"images": self.load_images(idx), "attributes": self.attributes[idx]}

    def batches(
        self, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True, drop_last: bool = False
    ) -> Iterator[dict]:
        """Mini-batches ``{"images", "attributes"}`` whose images are read only when the batch is due.

        The order is the one of :func:`mtsgd_jax.data.batch_iterator` for the same
        ``(seed, epoch)``; ``len(list(...)) == num_batches(len(self), batch_size, drop_last)``.
        """
        n = len(self)
        count = num_batches(n, batch_size, drop_last)
        order = epoch_permutation(n, seed, epoch)
        if not shuffle:
            order = np.arange(n)
        return (self[order[b * batch_size : (b + 1) * batch_size]] for b in range(count))


def _annotation(root: Path, name: str, sub: str, fmt: str) -> Path:
    candidates = [root / name, root / sub / name]
    p = find_first(candidates)
    if p is None:
        raise missing_file_error(f"CelebA file {name}", candidates, fmt)
    return p


def celeba_split(
    data_dir: str | os.PathLike,
    split: str = "train",
    *,
    attributes: Sequence[str | int] | None = None,
    max_examples: int | None = None,
    image_size: int = 64,
    center_crop: bool = True,
    num_threads: int = 0,
    check_images: bool = True,
) -> CelebASplit:
    """Read the annotations of one split; images load on demand (``load_images`` / ``batches``).

    Args:
      data_dir: CelebA folder (see the module docstring for the files).
      split: ``"train"``, ``"valid"``, ``"test"`` or ``"all"``.
      attributes: names or column indices of the attributes to keep (default all, file order).
      max_examples: keep only the first ``max_examples`` images of the split (file order).
      image_size: side of the square output images.
      center_crop: crop to the centred largest square before resizing.
      num_threads: threads that decode a batch (0 or 1: in the calling thread).
      check_images: raise now, naming the first missing one, if an image file of the split is missing.
    """
    if split not in CELEBA_PARTITIONS and split != "all":
        raise ValueError(f"split must be one of {list(CELEBA_PARTITIONS) + ['all']}, got {split!r}.")
    if max_examples is not None and max_examples < 0:
        raise ValueError(f"max_examples must be non-negative, got {max_examples}.")
    root = Path(data_dir)
    attr_path = _annotation(root, _ATTR_FILE, "Anno", "the attribute list (count line, names line, 'id v1..v40' lines)")
    ids, attrs, names = read_celeba_attributes(attr_path)
    if split == "all":
        rows = np.arange(len(ids))
    else:
        part_path = _annotation(root, _PART_FILE, "Eval", "the partition list ('image_id 0|1|2' lines)")
        partition = read_celeba_partition(part_path)
        missing = [i for i in ids if i not in partition]
        if missing:
            raise DataFormatError(
                f"{part_path}: no partition for {len(missing)} image(s) listed in {attr_path}, e.g. {missing[0]!r}."
            )
        want = CELEBA_PARTITIONS[split]
        rows = np.array([r for r, i in enumerate(ids) if partition[i] == want], dtype=np.int64)
    if max_examples is not None:
        rows = rows[:max_examples]
    if attributes is not None:
        cols = []
        for a in attributes:
            if isinstance(a, (int, np.integer)):
                if not 0 <= a < len(names):
                    raise ValueError(f"attribute index {a} out of range [0, {len(names)}).")
                cols.append(int(a))
            elif a in names:
                cols.append(names.index(a))
            else:
                raise ValueError(f"unknown attribute {a!r}; {attr_path} has {names}.")
        names = [names[c] for c in cols]
        attrs = attrs[:, cols]
    image_dir = root / _IMG_DIR
    if (image_dir / _IMG_DIR).is_dir():
        image_dir = image_dir / _IMG_DIR
    sel_ids = [ids[r] for r in rows]
    if check_images:
        if not image_dir.is_dir():
            raise FileNotFoundError(f"CelebA image folder {image_dir} does not exist (expected the aligned JPEGs there).")
        for i in sel_ids:
            if not (image_dir / i).is_file():
                raise FileNotFoundError(
                    f"CelebA image {image_dir / i} does not exist ({i} is in the {split} split of {attr_path})."
                )
    return CelebASplit(image_dir, sel_ids, np.ascontiguousarray(attrs[rows]), names, image_size, center_crop, num_threads)


def load_celeba(
    data_dir: str | os.PathLike,
    split: str = "train",
    *,
    attributes: Sequence[str | int] | None = None,
    max_examples: int | None = None,
    image_size: int = 64,
    center_crop: bool = True,
    load_images: bool = True,
    num_threads: int = 0,
) -> CelebAData:
    """Load one CelebA split at once: images (N, 64, 64, 3) float32 [0, 1] and attributes (N, A) int32 {0, 1}.

    Same arguments as :func:`celeba_split`; ``load_images=False`` returns ``images=None``
    (annotations only). All 162,770 training images at 64 x 64 take about 8 GB as
    float32, so prefer :func:`celeba_split` with ``batches`` or set ``max_examples``.
    """
    s = celeba_split(
        data_dir,
        split,
        attributes=attributes,
        max_examples=max_examples,
        image_size=image_size,
        center_crop=center_crop,
        num_threads=num_threads,
        check_images=load_images,
    )
    images = s.load_images() if load_images else None
    return CelebAData(images, s.attributes, s.attribute_names, s.image_ids)
