"""The training engine: calibration data, the LightningModule and the fit loop for the coefficients."""
