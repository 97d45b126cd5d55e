//! Query parameters that know their PostgreSQL type.
//!
//! Behind a transaction pooler a named prepared statement made on one server connection is
//! gone on the next transaction's, so there every statement is sent as one unnamed
//! Parse/Bind/Execute (`query_typed`), which needs each parameter's type up front. Every
//! Rust type we bind says its type here; a parameter of any other type does not compile.

use tokio_postgres::types::{Json, ToSql, Type};

/// A Rust type with one PostgreSQL type (and the type of an array of it).
pub trait SqlType {
    const SQL_TYPE: Type;
    const SQL_ARRAY_TYPE: Type;
}

macro_rules! sql_types {
    ($($t:ty => $ty:ident, $arr:ident;)*) => {
        $(impl SqlType for $t {
            const SQL_TYPE: Type = Type::$ty;
            const SQL_ARRAY_TYPE: Type = Type::$arr;
        })*
    };
}

sql_types! {
    bool => BOOL, BOOL_ARRAY;
    i16 => INT2, INT2_ARRAY;
    i32 => INT4, INT4_ARRAY;
    i64 => INT8, INT8_ARRAY;
    f32 => FLOAT4, FLOAT4_ARRAY;
    f64 => FLOAT8, FLOAT8_ARRAY;
    String => TEXT, TEXT_ARRAY;
    str => TEXT, TEXT_ARRAY;
    serde_json::Value => JSONB, JSONB_ARRAY;
    chrono::DateTime<chrono::Utc> => TIMESTAMPTZ, TIMESTAMPTZ_ARRAY;
}

impl<T> SqlType for Json<T> {
    const SQL_TYPE: Type = Type::JSONB;
    const SQL_ARRAY_TYPE: Type = Type::JSONB_ARRAY;
}

impl<T: SqlType + ?Sized> SqlType for &T {
    const SQL_TYPE: Type = T::SQL_TYPE;
    const SQL_ARRAY_TYPE: Type = T::SQL_ARRAY_TYPE;
}

impl<T: SqlType> SqlType for Option<T> {
    const SQL_TYPE: Type = T::SQL_TYPE;
    const SQL_ARRAY_TYPE: Type = T::SQL_ARRAY_TYPE;
}

impl<T: SqlType> SqlType for Vec<T> {
    const SQL_TYPE: Type = T::SQL_ARRAY_TYPE;
    // No arrays of arrays are bound.
    const SQL_ARRAY_TYPE: Type = T::SQL_ARRAY_TYPE;
}

impl<T: SqlType> SqlType for [T] {
    const SQL_TYPE: Type = T::SQL_ARRAY_TYPE;
    const SQL_ARRAY_TYPE: Type = T::SQL_ARRAY_TYPE;
}

/// One bound parameter: its value and its PostgreSQL type.
pub trait Param: Sync {
    fn sql(&self) -> &(dyn ToSql + Sync);
    fn sql_type(&self) -> Type;
}

impl<T: SqlType + ToSql + Sync> Param for T {
    fn sql(&self) -> &(dyn ToSql + Sync) {
        self
    }

    fn sql_type(&self) -> Type {
        T::SQL_TYPE
    }
}

/// Parameters of a query.
pub type Params<'a> = &'a [&'a dyn Param];

/// The values alone, for a statement prepared by the server (which infers the types).
pub(crate) fn values<'a>(params: Params<'a>) -> Vec<&'a (dyn ToSql + Sync)> {
    params.iter().map(|p| p.sql()).collect()
}

/// Values with their declared types, for an unnamed statement (`query_typed`).
pub(crate) fn typed<'a>(params: Params<'a>) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params.iter().map(|p| (p.sql(), p.sql_type())).collect()
}

/// Reads an unnamed statement's result to its end; the number of rows it affected.
pub(crate) async fn drain_count(
    rows: tokio_postgres::RowStream,
) -> Result<u64, tokio_postgres::Error> {
    use futures_util::TryStreamExt;
    let mut rows = std::pin::pin!(rows);
    while rows.try_next().await?.is_some() {}
    Ok(rows.rows_affected().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_follow_the_rust_type() {
        let id = 7i64;
        let name = "x";
        let ids = vec![1i64, 2];
        let none: Option<String> = None;
        let when = chrono::Utc::now();
        let slice: &[i64] = &ids;
        let params: Params = &[&id, &name, &ids, &none, &when, &slice];
        let types: Vec<Type> = typed(params).into_iter().map(|(_, t)| t).collect();
        assert_eq!(
            types,
            vec![
                Type::INT8,
                Type::TEXT,
                Type::INT8_ARRAY,
                Type::TEXT,
                Type::TIMESTAMPTZ,
                Type::INT8_ARRAY
            ]
        );
    }
}
