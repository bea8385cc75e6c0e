"""Drop-in replacements for other libraries' loss classes, built on fused_pref (see ``liger``)."""
