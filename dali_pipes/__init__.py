
# Data-path entry points, re-exported lazily so `python -m dali_pipes.manifest` stays light.
_EXPORTS = {"build_train_loader": "loader", "build_eval_loader": "loader", "TrainLoader": "loader",
            "EvalLoader": "loader", "Batch": "loader", "EvalBatch": "loader",
            "MixupCutmix": "mixup", "MultiDatasetSampler": "sampling"}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
