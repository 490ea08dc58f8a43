"""``python -m i2v_cli`` runs the ``i2v`` command."""

from .cli import main

main()
