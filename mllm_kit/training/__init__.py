"""Training: the LightningModule, stage data, the stage runner and its run directory, held-out evaluation."""
