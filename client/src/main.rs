//! `pushfleet`: see the library for the commands.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args();
    let program = args.next().unwrap_or_else(|| "pushfleet".into());
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("pushfleet: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(pushfleet_client::run(
        &program,
        args.collect(),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    ));
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
