//! Address, path and header patterns of routes.
