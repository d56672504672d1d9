"""What a plan costs, before anything runs: GPU-hours and token budgets (estimate), the training schedule's
optimizer steps (schedule), the training memory per GPU (memory). Pure arithmetic over the typed configs."""
