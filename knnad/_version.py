"""knnad's version, in a module of its own so that any module can read it without importing the
package ``__init__``."""
__version__ = "0.4.0.dev0"
