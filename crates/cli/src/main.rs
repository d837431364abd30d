//! `meshwork`: the microservice platform in one binary; the command line is
//! the library's [`meshwork::main`].

fn main() -> std::process::ExitCode {
    meshwork::main()
}
