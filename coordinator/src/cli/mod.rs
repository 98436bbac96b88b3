//! The `hotroll` command line.

pub mod check;
