//! The world the assistant and its mini-programs share, independent of
//! either: its clock, calendar arithmetic, cities and places in three
//! languages with their local time, and how amounts of money read. The
//! agent, memory, the server and the sandbox all use it; it uses nothing
//! of theirs.

pub mod calendar;
pub mod cities;
pub mod clock;
pub mod money;

pub use clock::Clock;
