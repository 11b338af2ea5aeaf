//! The world the assistant and its mini-programs share, independent of
//! either: its clock and calendar arithmetic. (Places and money formatting
//! belong here too; today they still live in `sandbox::cities` and in the
//! services, and the sandbox keeps a calendar of its own in `common`.)

pub mod calendar;
pub mod clock;
pub mod money;

pub use clock::Clock;
