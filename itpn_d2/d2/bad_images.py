"""Training through bad images: skip, count, log, and stop above a fraction.

:class:`SkipBadImages` wraps a training mapper. An image (or label) that is missing,
unreadable or truncated makes it log one warning naming the file and return ``None``, which
Detectron2's ``MapDataset`` answers by mapping another, random index. Calls and failures are
counted in shared memory, so the counts of every loader worker of a process add up;
:class:`BadImageHook` sums them over processes, writes ``data/bad_images`` to the trainer's
storage (``metrics.json``) and stops training with :class:`BadImagesError` once more than
``max_fraction`` of ``max(dataset size, images read)`` failed, as pretraining does per epoch.
A worker stops on its own counts too, so a dataset of only bad images cannot loop forever.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

from detectron2.config import instantiate
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.registry import locate

from ..errors import UserError, disk_full_message
from .data import DatasetError, config_dataset_names

__all__ = ["BAD_IMAGE_ERRORS", "BadImageHook", "BadImagesError", "SkipBadImages",
           "evaluation_image_errors", "instantiate_train_loader", "json_errors_named",
           "name_bad_json"]

logger = logging.getLogger(__name__)

# What reading one bad file raises: missing (FileNotFoundError), unreadable or truncated
# (PIL's OSError / UnidentifiedImageError; SyntaxError for broken PNG chunks), or an image
# whose size differs from its dataset record. Label *values* out of range (LabelError) are a
# dataset conversion problem and still stop training.
BAD_IMAGE_ERRORS = (OSError, SyntaxError, SizeMismatchError)


class BadImagesError(UserError, RuntimeError):
    """More training images failed to load than ``train.max_bad_image_fraction`` allows."""

    def __str__(self) -> str:
        # A DataLoader worker's exception comes back as "Caught ... Original Traceback ...
        # BadImagesError: <message>": keep the message only.
        text = super().__str__()
        marker = f"{type(self).__name__}: "
        return text.rsplit(marker, 1)[-1].strip() if "Original Traceback" in text else text


def allowed_bad(max_fraction: float, dataset_size: int, seen: int) -> float:
    """How many failures ``max_fraction`` allows after ``seen`` reads of a dataset."""
    return max_fraction * max(dataset_size, seen)


def bad_images_message(bad: int, seen: int, max_fraction: float, dataset_size: int,
                       first: str = "") -> str:
    first = f" (first: {first})" if first else ""
    return (f"{bad} of {seen} training images could not be read{first}, more than "
            f"train.max_bad_image_fraction={max_fraction} of the {dataset_size} images allows; "
            f"fix or remove the files (the warnings above name them) or raise "
            f"train.max_bad_image_fraction")


class SkipBadImages:
    """A training mapper that returns ``None`` for a bad image, counting reads and failures.

    Args:
        mapper: the dataset mapper (``DatasetMapper``, ``SemSegDatasetMapper``...).
        dataset_size: images in the training set (the base of the fraction).
        max_fraction: the failed fraction at which to stop (0: stop at the first).
        world_size: processes that share the dataset (each worker checks its share).
    """

    def __init__(self, mapper: Callable[[dict], Any], dataset_size: int, max_fraction: float,
                 world_size: int = 1):
        self.mapper = mapper
        self.dataset_size = dataset_size
        self.max_fraction = max_fraction
        self.world_size = world_size
        # Shared with the DataLoader workers (inherited at fork, passed at spawn).
        self._seen = mp.Value("q", 0)
        self._bad = mp.Value("q", 0)

    def counts(self) -> Tuple[int, int]:
        """(images read, images that failed) by this process and its loader workers."""
        return self._seen.value, self._bad.value

    def __call__(self, record: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        with self._seen.get_lock():
            self._seen.value += 1
            seen = self._seen.value
        try:
            return self.mapper(record)
        except BAD_IMAGE_ERRORS as e:
            with self._bad.get_lock():
                self._bad.value += 1
                bad = self._bad.value
            path = record.get("file_name", "?")
            logger.warning("skipping training image %s: %s: %s (%d skipped of %d read)", path,
                           type(e).__name__, e, bad, seen)
            share = self.dataset_size / self.world_size
            if bad > allowed_bad(self.max_fraction, share, seen):
                raise BadImagesError(bad_images_message(bad, seen, self.max_fraction,
                                                        self.dataset_size, path)) from None
            return None


class BadImageHook(HookBase):
    """Sum :class:`SkipBadImages` counts over processes every ``period`` iterations (and at the
    end); log new failures, store ``data/bad_images`` and stop above the fraction."""

    def __init__(self, guard: SkipBadImages, period: int = 20):
        self.guard = guard
        self.period = max(1, period)
        self._reported = 0

    def totals(self) -> Tuple[int, int]:
        counts = comm.all_gather(self.guard.counts()) if comm.get_world_size() > 1 \
            else [self.guard.counts()]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def _check(self) -> None:
        seen, bad = self.totals()
        self.trainer.storage.put_scalar("data/bad_images", bad, smoothing_hint=False)
        if bad > self._reported:
            logger.warning("%d training images skipped so far (of %d read)", bad, seen)
            self._reported = bad
        g = self.guard
        if bad > allowed_bad(g.max_fraction, g.dataset_size, seen):
            raise BadImagesError(bad_images_message(bad, seen, g.max_fraction, g.dataset_size))

    def after_step(self) -> None:
        if (self.trainer.iter + 1) % self.period == 0:
            self._check()

    def after_train(self) -> None:
        if self.trainer.iter + 1 >= self.trainer.max_iter:  # finished: report the total
            seen, bad = self.totals()
            if bad:
                logger.warning("training skipped %d unreadable images (of %d read)", bad, seen)


def instantiate_train_loader(loader_cfg, max_fraction: float) -> Tuple[Any, SkipBadImages]:
    """``instantiate(loader_cfg)`` (e.g. ``dataloader.train``) with its ``mapper`` wrapped in
    :class:`SkipBadImages`; returns ``(loader, guard)``."""
    kwargs = {str(k): instantiate(loader_cfg[k]) for k in loader_cfg if k != "_target_"}
    target = loader_cfg._target_
    target = locate(target) if isinstance(target, str) else target
    dataset = kwargs["dataset"]
    size = len(dataset) if hasattr(dataset, "__len__") else 0
    guard = SkipBadImages(kwargs["mapper"], size, max_fraction, comm.get_world_size())
    kwargs["mapper"] = guard
    return target(**kwargs), guard


def name_bad_json(names: Sequence[str], error: json.JSONDecodeError) -> DatasetError:
    """A :class:`DatasetError` naming the ``json_file`` of ``names`` that does not parse."""
    for name in names:
        path = MetadataCatalog.get(name).get("json_file") if name in MetadataCatalog.list() \
            else None
        if not path:
            continue
        try:
            with open(path) as f:
                json.load(f)
        except json.JSONDecodeError as e:
            return DatasetError(f"dataset {name!r}: {path} is not valid JSON ({e}); is the file "
                                f"complete (an interrupted download or copy)?")
        except OSError:
            continue
    return DatasetError(f"a dataset JSON file of {', '.join(names)} is not valid JSON ({error})")


@contextlib.contextmanager
def evaluation_image_errors() -> Iterator[None]:
    """A bad image during evaluation stops it with one message: skipping would score a subset.

    (A DataLoader worker's error arrives with its traceback in the message: keep the last line.)
    """
    try:
        yield
    except BAD_IMAGE_ERRORS as e:
        if isinstance(e, OSError) and disk_full_message(e):
            raise
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DatasetError(f"evaluation stopped at a bad test image: {last}; fix or remove it "
                           f"from the test dataset") from None


@contextlib.contextmanager
def json_errors_named(cfg, split: str) -> Iterator[None]:
    """Turn a ``JSONDecodeError`` while loading ``dataloader.<split>``'s datasets, or the
    ``KeyError`` of a COCO file without one of its lists, into a :class:`DatasetError` naming
    the file (the original messages do not)."""
    try:
        yield
    except json.JSONDecodeError as e:
        raise name_bad_json(config_dataset_names(cfg, (split,)), e) from None
    except KeyError as e:
        problem = name_incomplete_coco(config_dataset_names(cfg, (split,)))
        if problem is None:
            raise
        raise problem from e


COCO_LISTS = ("images", "annotations", "categories")


def name_incomplete_coco(names: Sequence[str]) -> Optional[DatasetError]:
    """A :class:`DatasetError` naming the COCO ``json_file`` of ``names`` that lacks one of
    :data:`COCO_LISTS` (None: every file has them)."""
    for name in names:
        path = MetadataCatalog.get(name).get("json_file") if name in MetadataCatalog.list() \
            else None
        try:
            with open(path) as f:
                data = json.load(f)
        except (TypeError, OSError, ValueError):
            continue
        missing = [key for key in COCO_LISTS if key not in data] if isinstance(data, dict) \
            else list(COCO_LISTS)
        if missing:
            return DatasetError(f"dataset {name!r}: {path} has no {', '.join(map(repr, missing))}; "
                                f"a COCO instances file needs the lists {', '.join(COCO_LISTS)}")
    return None
