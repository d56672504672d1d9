"""python -m src.report ...: see src/report/__init__.py."""
from src.report.render import main

main()
