"""``python -m diffca_med.cli`` (also ``accelerate launch -m diffca_med.cli`` and
``torchrun -m diffca_med.cli``): the same app as the ``diffca-med`` console script."""

from diffca_med.cli.app import main

if __name__ == "__main__":
    main()
