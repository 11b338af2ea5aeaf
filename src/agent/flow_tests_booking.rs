//! Flow tests for booking (scripted generator, real sandbox services).
