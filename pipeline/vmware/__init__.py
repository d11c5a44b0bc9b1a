"""VMware VM descriptions (``.vmx``, ``.ovf``/``.ova``): pure parsers, no program is run here."""
