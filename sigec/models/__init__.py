"""Reference architectures no installable package provides, and named model configs."""
