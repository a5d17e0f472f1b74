# Imported as a top-level package (``import services`` from the repository root) this folder would be a
# second copy of ``autellix.services``, with classes unequal to the real ones: refuse it.
if not __name__.startswith("autellix."):
    raise ImportError(f"import autellix.{__name__}, not {__name__}: the folder is a sub-package of autellix")
