"""Where each training image's caption comes from, for text-conditioned models.

Three sources, in this order:
  data.caption_template  "a handwritten digit {name}" filled with each image's class name (labelled data only)
  data.caption_column    a column of the data set: a Hub/parquet column, or a column of an image folder's
                         metadata.jsonl / metadata.csv (the `datasets` image-folder convention: `file_name` + columns)
  "text"                 an image folder's metadata column of that name, used when nothing else is set

A `CaptionSource` turns a batch of rows (the `Dataset.set_transform` protocol: a dict of column lists) into captions.
"""

from __future__ import annotations

from dataclasses import dataclass

from ldm.config import DataConfig

METADATA_TEXT_COLUMN = "text"  # the caption column name of the datasets image-folder convention


class CaptionError(ValueError):
    """The data gives no captions where text conditioning needs them."""


@dataclass
class CaptionSource:
    column: str | None  # the data set column holding captions, or None for a template
    template: str | None = None  # "... {name} ..." filled with the class name of the label column
    label_column: str | None = None  # template only
    class_names: list[str] | None = None  # template only; None: the label's integer is its name

    @property
    def columns(self) -> list[str]:
        """Columns that the batch transform must be given."""
        return [self.column] if self.column else [self.label_column]

    def __call__(self, batch: dict[str, list]) -> list[str]:
        if self.column is not None:
            return ["" if text is None else str(text) for text in batch[self.column]]
        return [self.template.format(name=self.name(int(label))) for label in batch[self.label_column]]

    def name(self, label: int) -> str:
        return self.class_names[label] if self.class_names else str(label)

    def describe(self) -> str:
        return f"column {self.column!r}" if self.column else f"template {self.template!r}"


def resolve_caption_source(cfg: DataConfig, column_names: list[str] | None, label_column: str | None,
                           class_names: list[str] | None) -> CaptionSource:
    """The caption source that `cfg` asks for, checked against the data set's columns and labels."""
    if cfg.caption_template:
        if label_column is None:
            raise CaptionError(f"data.caption_template={cfg.caption_template!r} fills in class names, but data "
                               f"{cfg.path or cfg.source!r} has no labels; set data.label_column (hub), use class "
                               "sub-folders (folder), or give captions with data.caption_column")
        return CaptionSource(None, cfg.caption_template, label_column, class_names)
    column = cfg.caption_column or (METADATA_TEXT_COLUMN if cfg.source == "folder" else None)
    if column is None:
        raise CaptionError("denoiser.conditioning=text needs captions: set data.caption_column (the column holding "
                           "them) or data.caption_template (e.g. 'a photo of a {name}' over the class names)")
    if column_names is not None and column not in column_names:
        where = ("an image folder gives captions through metadata.jsonl or metadata.csv beside the images, with a "
                 f"file_name column and a {column!r} column" if cfg.source == "folder"
                 else f"available columns: {', '.join(column_names)}")
        raise CaptionError(f"data.caption_column={column!r} is not a column of {cfg.path!r}; {where}")
    return CaptionSource(column)


def all_captions(dataset, source: CaptionSource) -> list[str]:
    """Every caption of a training set, read without decoding images: from a latent cache's caption column, or by
    applying `source` to the raw columns of an image data set."""
    if "caption" in dataset.column_names:  # a latent cache
        return list(dataset.with_format(None)["caption"])
    raw = dataset.with_format(None).select_columns(source.columns)
    return source(raw[:])


def class_prompts(source: CaptionSource | None, num_classes: int | None) -> list[str] | None:
    """The prompt of each class when captions come from a template over class names (else None)."""
    if source is None or source.template is None or num_classes is None:
        return None
    return [source.template.format(name=source.name(k)) for k in range(num_classes)]
