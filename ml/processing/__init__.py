"""Raw meshes -> an UltraShape training set (samples, renders, data lists). See pipeline.py.

    python -m ml.processing --input-dir data/input --output-dir data/output --config configs/processing.yaml
    from ml.processing import run, ProcessingConfig; run(ProcessingConfig(input_dir=..., output_dir=...))
"""

from ml.processing.config import ProcessingConfig
from ml.processing.pipeline import run

__all__ = ["ProcessingConfig", "run"]
