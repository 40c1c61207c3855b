//! Routing of new connections.
