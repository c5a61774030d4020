//! diesel table definitions; must match `migrations/{postgres,sqlite}`.

diesel::table! {
    agents (id) {
        id -> Text,
        created_at -> BigInt,
        online -> Bool,
        pod -> Nullable<Text>,
        epoch -> BigInt,
        connected_at -> Nullable<BigInt>,
        last_seen -> Nullable<BigInt>,
        version -> Nullable<Text>,
        hostname -> Nullable<Text>,
        os -> Nullable<Text>,
        arch -> Nullable<Text>,
    }
}

diesel::table! {
    commands (id) {
        id -> Text,
        agent_id -> Text,
        name -> Text,
        args -> Text,
        status -> Text,
        output -> Nullable<Text>,
        created_at -> BigInt,
        delivered_at -> Nullable<BigInt>,
        completed_at -> Nullable<BigInt>,
        expires_at -> Nullable<BigInt>,
        attempts -> Integer,
    }
}

diesel::table! {
    inventories (agent_id) {
        agent_id -> Text,
        body -> Text,
        size_bytes -> BigInt,
        received_at -> BigInt,
    }
}

diesel::joinable!(commands -> agents (agent_id));
diesel::joinable!(inventories -> agents (agent_id));
diesel::allow_tables_to_appear_in_same_query!(agents, commands, inventories);
