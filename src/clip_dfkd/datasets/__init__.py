"""Kedro datasets the project needs beyond kedro-datasets; each writes whole or not at all.
The catalog names them ``clip_dfkd.datasets.<Class>``."""

from clip_dfkd.datasets.artefacts import StudentModelDataset, StyleBankDataset, TeacherOutputCacheDataset
from clip_dfkd.datasets.mlflow_datasets import MetricPoints, MlflowMetricsDataset, MlflowTableDataset
from clip_dfkd.datasets.partitions import ImageFileLoader, PartitionLoader, ResumablePartitionedDataset
from clip_dfkd.datasets.tables import CLASSES_KEY, MarkdownDataset, ParquetDataset, TextPreview

__all__ = [
    "CLASSES_KEY",
    "ImageFileLoader",
    "MarkdownDataset",
    "MetricPoints",
    "MlflowMetricsDataset",
    "MlflowTableDataset",
    "ParquetDataset",
    "PartitionLoader",
    "ResumablePartitionedDataset",
    "StudentModelDataset",
    "StyleBankDataset",
    "TeacherOutputCacheDataset",
    "TextPreview",
]
