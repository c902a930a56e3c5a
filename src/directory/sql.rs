//! The SQL source (PostgreSQL): the configured query, prepared once per connection, run with
//! the user as its one parameter (`$1`): the user is sent apart from the query text and never
//! spliced into it, so quotes or `;` in a name are only characters of a value.
//!
//! The first column is the host (text: `host` or `host:port`), the second, if the query has
//! one, the port (an integer; NULL → `default_port`). No row: not found. Several rows: an error
//! (the query is ambiguous), never a guess.
//!
//! Connections are plain TCP (or a UNIX socket): no TLS, so keep the database on loopback or a
//! trusted network. At most `pool_size` connections, each carrying one query at a time; more
//! lookups wait for one; one unused for a minute is closed. A kept connection that fails is dropped and the query tried once more
//! on a new one; the whole lookup has `timeout`.

use tokio::sync::Semaphore;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls, Row, Statement};

use super::idle::Idle;
use super::{Answer, LookupError, Route, server_address, split_host_port};
use crate::config::SqlLookup;

pub(crate) struct SqlSource {
    config: SqlLookup,
    /// Connections not in use, with the query prepared on each.
    idle: Idle<Connection>,
    /// One per connection: a lookup holds one while it uses a connection.
    slots: Semaphore,
}

struct Connection {
    client: Client,
    statement: Statement,
    /// The port column's type, when the query has one.
    port: Option<PortColumn>,
}

/// The integer types a port column may have.
#[derive(Debug, Clone, Copy)]
enum PortColumn {
    Int2,
    Int4,
    Int8,
}

impl SqlSource {
    /// Connects nothing: the first lookup does.
    pub(crate) fn new(config: &SqlLookup) -> Self {
        SqlSource {
            config: config.clone(),
            idle: Idle::new(),
            slots: Semaphore::new(config.pool_size),
        }
    }

    /// Where `user` (the routing key) goes.
    /// How long one question may take (`Directory` holds it to that).
    pub(crate) fn timeout(&self) -> std::time::Duration {
        self.config.timeout
    }

    pub(crate) async fn ask(&self, user: &str) -> Result<Answer, LookupError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| LookupError::Failed("closed".into()))?;
        if let Some(connection) = self.idle.pop(|c| !c.client.is_closed()) {
            match self.query(connection, user).await {
                Ok(answer) => return answer,
                // The kept connection is gone; a new one gets the same question.
                Err(_broken) => {}
            }
        }
        let connection = self.connect().await?;
        self.query(connection, user).await?
    }

    /// A new connection with the query prepared and its shape checked.
    async fn connect(&self) -> Result<Connection, LookupError> {
        let (client, connection) = self
            .config
            .connect
            .connect(NoTls)
            .await
            .map_err(|e| LookupError::Failed(format!("connect: {e}")))?;
        tokio::spawn(async move {
            // Ends when the client is dropped, or the server goes.
            let _ = connection.await;
        });
        let statement = client
            .prepare(&self.config.query)
            .await
            .map_err(|e| LookupError::Failed(format!("prepare the query: {e}")))?;
        let port = shape(&statement).map_err(LookupError::Failed)?;
        Ok(Connection {
            client,
            statement,
            port,
        })
    }

    /// One query on `connection`. The outer error is the connection's (it is dropped); the
    /// inner result is the database's answer (the connection is kept for the next lookup).
    async fn query(
        &self,
        connection: Connection,
        user: &str,
    ) -> Result<Result<Answer, LookupError>, LookupError> {
        let params: [&(dyn ToSql + Sync); 1] = [&user];
        let answer = match connection
            .client
            .query(&connection.statement, &params)
            .await
        {
            Ok(rows) => self.answer(&rows, connection.port),
            // The server said no (a type error, a missing table): the connection is fine.
            Err(e) if e.as_db_error().is_some() => Err(LookupError::Failed(format!("query: {e}"))),
            Err(e) => return Err(LookupError::Failed(format!("query: {e}"))),
        };
        self.idle.push(connection, self.config.pool_size);
        Ok(answer)
    }

    fn answer(&self, rows: &[Row], port: Option<PortColumn>) -> Result<Answer, LookupError> {
        let row = match rows {
            [] => return Ok(Answer::NotFound),
            [row] => row,
            _ => {
                return Err(LookupError::Failed(format!(
                    "the query returned {} rows for one user",
                    rows.len()
                )));
            }
        };
        let bad = |e: tokio_postgres::Error| LookupError::Failed(format!("the row: {e}"));
        let host: Option<&str> = row.try_get(0).map_err(bad)?;
        let host = host.ok_or_else(|| LookupError::Failed("the host is NULL".into()))?;
        let (host, port_in_host) = split_host_port(host.trim())?;
        let port: Option<i64> = match port {
            None => None,
            Some(PortColumn::Int2) => row
                .try_get::<_, Option<i16>>(1)
                .map_err(bad)?
                .map(i64::from),
            Some(PortColumn::Int4) => row
                .try_get::<_, Option<i32>>(1)
                .map_err(bad)?
                .map(i64::from),
            Some(PortColumn::Int8) => row.try_get::<_, Option<i64>>(1).map_err(bad)?,
        };
        let port = match port {
            Some(p) => u16::try_from(p)
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| LookupError::Failed(format!("{p} is not a port")))?,
            None => port_in_host.unwrap_or(self.config.default_port),
        };
        Ok(Answer::Found(Route {
            server: server_address(host, port)?,
            user: None,
            password: None,
        }))
    }
}

/// Whether the prepared query takes one text parameter and returns a text host and an optional
/// integer port; the port column's type.
fn shape(statement: &Statement) -> Result<Option<PortColumn>, String> {
    match statement.params() {
        [one] if <&str as ToSql>::accepts(one) => {}
        params => {
            return Err(format!(
                "the query must take exactly one text parameter ($1, the user), not {params:?}"
            ));
        }
    }
    let columns = statement.columns();
    let Some(host) = columns.first() else {
        return Err("the query returns no column (the first must be the host)".into());
    };
    if !matches!(
        *host.type_(),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME
    ) {
        return Err(format!(
            "the first column ({}) must be text (the host), not {}",
            host.name(),
            host.type_()
        ));
    }
    match columns.get(1) {
        None => Ok(None),
        Some(c) => match *c.type_() {
            Type::INT2 => Ok(Some(PortColumn::Int2)),
            Type::INT4 => Ok(Some(PortColumn::Int4)),
            Type::INT8 => Ok(Some(PortColumn::Int8)),
            ref other => Err(format!(
                "the second column ({}) must be an integer (the port), not {other}",
                c.name()
            )),
        },
    }
}
