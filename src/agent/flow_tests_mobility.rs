//! Flow tests for mobility (scripted generator, real sandbox services).
