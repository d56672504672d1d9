"""The pure rules of the method, one noun per module: verdict parsing (verdicts), the filtering rules (filters),
metrics and the statistics behind intervals (metrics, stats, analysis), decontamination and the label-noise audit
(decontamination, audit). No model, no file, no MLflow: functions of their arguments, tested as such."""
