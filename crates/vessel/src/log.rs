//! vessel's own messages on stderr, one line each: `vessel: text` (info),
//! `vessel: warning: text`, `vessel: error: text`. `VESSEL_LOG` sets the filter:
//! a level (`debug`) or targets with levels (`vmm=trace,info`). A plain target filter,
//! not a regex engine: the monitor's own memory stays small.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

struct OneLine;

impl<S, N> FormatEvent<S, N> for OneLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let level = match *event.metadata().level() {
            Level::INFO => "",
            Level::WARN => "warning: ",
            Level::ERROR => "error: ",
            Level::DEBUG => "debug: ",
            Level::TRACE => "trace: ",
        };
        write!(writer, "vessel: {level}")?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    write!(writer, "{fields}: ")?;
                }
            }
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

pub fn init() {
    let spec = std::env::var("VESSEL_LOG").unwrap_or_default();
    let filter: Targets = spec.parse().unwrap_or_else(|_| {
        eprintln!(
            "vessel: warning: ignoring VESSEL_LOG={spec:?} (want e.g. debug or vmm=trace,info)"
        );
        Targets::new().with_default(tracing::Level::INFO)
    });
    let filter = if spec.is_empty() {
        Targets::new().with_default(tracing::Level::INFO)
    } else {
        filter
    };
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .event_format(OneLine),
        )
        .with(filter)
        .init();
}
