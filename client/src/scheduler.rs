//! `pushfleet wakeup-scheduler --config FILE`: wakes the devices whose SIP registration passed
//! `[wakeup] register_wakeup_threshold` of its lifetime, each once per registration, until
//! SIGTERM or SIGINT. Run one or several (they share the work through Postgres).

use std::io::Write;
use std::path::Path;

use pushfleet_core::service::{init_logging, shutdown_signal};
use pushfleet_core::wakeup::Scheduler;
use pushfleet_core::Settings;
use tokio::sync::watch;

use crate::args::{Args, Error};

pub async fn run(args: &Args, out: &mut dyn Write) -> Result<i32, Error> {
    args.only(&["config"])?;
    let [config] = args.required(["config"])?;
    let settings = Settings::load(Path::new(config)).map_err(|e| Error::Failed(e.to_string()))?;
    init_logging(&settings.log);
    let scheduler = Scheduler::connect(settings)
        .await
        .map_err(|e| Error::Failed(e.to_string()))?;
    let _ = writeln!(
        out,
        "wake-up scheduler running; stop it with SIGTERM or Ctrl-C"
    );
    let (stop, stopped) = watch::channel(false);
    let signal = tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    let result = scheduler.run(stopped).await;
    signal.abort();
    result.map_err(|e| Error::Failed(e.to_string()))?;
    Ok(crate::OK)
}
