"""nn/inference.py: the benchmark of the step's variants (the step itself is tested through
--mode=predict's files in test_predict.py and through --mode=live in test_live.py)."""
from nn import config, inference
from test_predict import CLASSES, tiny_model


def test_benchmark_reports_the_three_variants():
    cfg = config.parse_args(["--target_height=16", "--target_width=16", f"--num_classes={CLASSES}",
                             "--use_nchw=false", "--batch_size=2"])
    rates = inference.benchmark(cfg, tiny_model(), 1, repeats=1)
    assert set(rates) == {"without maps", "with maps (layer size)", "with maps (resized)"}
    assert all(r > 0 for r in rates.values())
