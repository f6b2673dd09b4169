"""Training RAHF reward models on RichHF-18K-format data.

    fnf rahf-train fit --config configs/rahf/train_tiny.yaml

``data`` reads the jsonl format, ``metrics`` holds the paper's heatmap / score metrics, ``module`` the
LightningModule; the model and the reward head live in ``fnf.rewards.rahf``.
"""
