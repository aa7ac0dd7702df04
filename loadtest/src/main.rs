//! Load-test harness entry point; the goose scenarios arrive with the load-test issue.
fn main() {}
