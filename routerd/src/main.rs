//! `vsock-routerd`: see `vsock-routerd --help` and `docs/vhost-user.md`.

use std::process::ExitCode;

use vsock_routerd::cli::{self, Command, USAGE_EXIT_CODE};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match cli::parse_args(&args) {
        Ok(Command::Help) => {
            print!("{}", cli::HELP);
            0
        }
        Ok(Command::Version) => {
            println!("vsock-routerd {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Ok(Command::Run(config)) => {
            vsock_vmm::logger::init_as("vsock-routerd", config.log_level, config.log_format);
            match vsock_routerd::daemon::run(&config) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("vsock-routerd: error: {e}");
                    1
                }
            }
        }
        Err(e) => {
            eprintln!("vsock-routerd: error: {e}");
            USAGE_EXIT_CODE
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}
