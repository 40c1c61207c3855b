//! Backends: where connections go once routed.
