// SQLite calls of the ingest worker; the SQL mirrors aggregator/store.py.
#include "state_store.hpp"

#include <utility>

namespace edgefl::ingest {
namespace {

constexpr int kSchemaVersion = 2;  // aggregator/store.py SCHEMA_VERSION
constexpr int kBusyTimeoutMs = 30000;

// Resets a statement when it goes out of scope, so the next use starts clean.
struct Use {
  sqlite3_stmt* s;
  ~Use() {
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
  }
};

void bind_text(sqlite3_stmt* s, int i, const std::string& v) {
  sqlite3_bind_text(s, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
}

std::string column_blob(sqlite3_stmt* s, int i) {
  const void* data = sqlite3_column_blob(s, i);
  return data ? std::string(static_cast<const char*>(data), sqlite3_column_bytes(s, i)) : std::string();
}

}  // namespace

StateStore::StateStore(const std::string& path) {
  if (sqlite3_open_v2(path.c_str(), &db_, SQLITE_OPEN_READWRITE, nullptr) != SQLITE_OK)
    fail("cannot open " + path);
  sqlite3_busy_timeout(db_, kBusyTimeoutMs);  // the leader and other workers write it too
  exec("PRAGMA synchronous=FULL");  // a committed update survives power loss (WAL is the file's)
  sqlite3_stmt* version = prepare("PRAGMA user_version");
  if (sqlite3_step(version) != SQLITE_ROW || sqlite3_column_int(version, 0) != kSchemaVersion)
    throw StoreError(path + " is not a schema " + std::to_string(kSchemaVersion) +
                     " aggregator state database");
  sqlite3_reset(version);
  latest_round_ = prepare("SELECT MAX(round) FROM globals");
  latest_global_ = prepare("SELECT round, adapter FROM globals ORDER BY round DESC LIMIT 1");
  is_accepted_ = prepare("SELECT 1 FROM accepted WHERE update_id = ?");
  slot_reported_ = prepare("SELECT 1 FROM accepted WHERE round = ? AND device_id = ?");
  partial_ = prepare("SELECT snapshot, weight, metric_sums, bytes FROM partials "
                     "WHERE round = ? AND worker = ?");
  rejections_ = prepare("SELECT counts FROM worker_rejections WHERE worker = ?");
  insert_accepted_ = prepare("INSERT INTO accepted VALUES (?, ?, ?, ?, ?, 0, NULL)");
  upsert_partial_ = prepare(
      "INSERT INTO partials VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (round, worker) "
      "DO UPDATE SET snapshot = excluded.snapshot, weight = excluded.weight, "
      "metric_sums = excluded.metric_sums, bytes = excluded.bytes, "
      "count = count + excluded.count");
  record_rejections_ = prepare("INSERT OR REPLACE INTO worker_rejections VALUES (?, ?)");
}

StateStore::~StateStore() {
  for (sqlite3_stmt* s : statements_) sqlite3_finalize(s);
  sqlite3_close(db_);
}

sqlite3_stmt* StateStore::prepare(const char* sql) {
  sqlite3_stmt* s = nullptr;
  if (sqlite3_prepare_v2(db_, sql, -1, &s, nullptr) != SQLITE_OK) fail("cannot prepare a query");
  statements_.push_back(s);
  return s;
}

void StateStore::exec(const char* sql) {
  if (sqlite3_exec(db_, sql, nullptr, nullptr, nullptr) != SQLITE_OK) fail(sql);
}

void StateStore::fail(const std::string& what) {
  throw StoreError("state database: " + what + ": " + sqlite3_errmsg(db_));
}

std::optional<int64_t> StateStore::latest_round() {
  Use u{latest_round_};
  if (sqlite3_step(latest_round_) != SQLITE_ROW) fail("reading the newest round");
  if (sqlite3_column_type(latest_round_, 0) == SQLITE_NULL) return std::nullopt;
  return sqlite3_column_int64(latest_round_, 0);
}

std::optional<std::pair<int64_t, std::string>> StateStore::latest_global() {
  Use u{latest_global_};
  int rc = sqlite3_step(latest_global_);
  if (rc == SQLITE_DONE) return std::nullopt;
  if (rc != SQLITE_ROW) fail("reading the newest global");
  return std::make_pair(sqlite3_column_int64(latest_global_, 0), column_blob(latest_global_, 1));
}

bool StateStore::is_accepted(const std::string& update_id) {
  Use u{is_accepted_};
  bind_text(is_accepted_, 1, update_id);
  int rc = sqlite3_step(is_accepted_);
  if (rc != SQLITE_ROW && rc != SQLITE_DONE) fail("looking up an update id");
  return rc == SQLITE_ROW;
}

bool StateStore::slot_reported(int64_t round, const std::string& slot) {
  Use u{slot_reported_};
  sqlite3_bind_int64(slot_reported_, 1, round);
  bind_text(slot_reported_, 2, slot);
  int rc = sqlite3_step(slot_reported_);
  if (rc != SQLITE_ROW && rc != SQLITE_DONE) fail("looking up a slot");
  return rc == SQLITE_ROW;
}

std::optional<PartialRow> StateStore::partial(int64_t round, const std::string& worker) {
  Use u{partial_};
  sqlite3_bind_int64(partial_, 1, round);
  bind_text(partial_, 2, worker);
  int rc = sqlite3_step(partial_);
  if (rc == SQLITE_DONE) return std::nullopt;
  if (rc != SQLITE_ROW) fail("reading this worker's partial sum");
  PartialRow row;
  row.snapshot = column_blob(partial_, 0);
  row.weight = sqlite3_column_double(partial_, 1);
  row.metric_sums = reinterpret_cast<const char*>(sqlite3_column_text(partial_, 2));
  row.bytes = sqlite3_column_int64(partial_, 3);
  return row;
}

std::optional<std::string> StateStore::rejections(const std::string& worker) {
  Use u{rejections_};
  bind_text(rejections_, 1, worker);
  int rc = sqlite3_step(rejections_);
  if (rc == SQLITE_DONE) return std::nullopt;
  if (rc != SQLITE_ROW) fail("reading this worker's rejection counts");
  return std::string(reinterpret_cast<const char*>(sqlite3_column_text(rejections_, 0)));
}

Commit StateStore::accept_partial(const std::string& worker, int64_t round,
                                  const std::vector<AcceptedRow>& rows, const PartialRow& partial,
                                  const std::string& rejections_json) {
  exec("BEGIN IMMEDIATE");
  try {
    if (latest_round() != round) {
      exec("ROLLBACK");
      return Commit::kRoundClosed;
    }
    for (const AcceptedRow& row : rows) {
      Use u{insert_accepted_};
      bind_text(insert_accepted_, 1, row.update_id);
      sqlite3_bind_int64(insert_accepted_, 2, round);
      bind_text(insert_accepted_, 3, row.slot);
      sqlite3_bind_int64(insert_accepted_, 4, row.num_samples);
      sqlite3_bind_double(insert_accepted_, 5, row.weight);
      int rc = sqlite3_step(insert_accepted_);
      if ((rc & 0xFF) == SQLITE_CONSTRAINT) {  // another worker counted this slot or id first
        sqlite3_reset(insert_accepted_);
        exec("ROLLBACK");
        return Commit::kSlotTaken;
      }
      if (rc != SQLITE_DONE) fail("storing an accepted update");
    }
    {
      Use u{upsert_partial_};
      sqlite3_bind_int64(upsert_partial_, 1, round);
      bind_text(upsert_partial_, 2, worker);
      if (partial.snapshot.empty()) {
        sqlite3_bind_null(upsert_partial_, 3);
      } else {
        sqlite3_bind_blob(upsert_partial_, 3, partial.snapshot.data(),
                          static_cast<int>(partial.snapshot.size()), SQLITE_STATIC);
      }
      sqlite3_bind_double(upsert_partial_, 4, partial.weight);
      bind_text(upsert_partial_, 5, partial.metric_sums);
      sqlite3_bind_int64(upsert_partial_, 6, partial.bytes);
      sqlite3_bind_int64(upsert_partial_, 7, static_cast<int64_t>(rows.size()));
      if (sqlite3_step(upsert_partial_) != SQLITE_DONE) fail("storing the partial sum");
    }
    record_rejections(worker, rejections_json);
    exec("COMMIT");
  } catch (const StoreError&) {
    sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
    throw;
  }
  return Commit::kDone;
}

void StateStore::record_rejections(const std::string& worker, const std::string& json) {
  Use u{record_rejections_};
  bind_text(record_rejections_, 1, worker);
  bind_text(record_rejections_, 2, json);
  if (sqlite3_step(record_rejections_) != SQLITE_DONE) fail("storing the rejection counts");
}

}  // namespace edgefl::ingest
