//! `meshwork-system`: the `meshwork` command line (`meshwork::main`) built
//! for the system tests of this package; see the crate's library.

fn main() -> std::process::ExitCode {
    meshwork::main()
}
