"""The queue's state transitions, one Lua script each (``worker.jobqueue`` describes the keys).

Redis runs a script atomically but does not roll it back: a command that fails half-way leaves
the writes before it in place. So every script reads and checks what it needs first (the types
of the keys it writes, the counters it increments) and only then writes, with commands that
cannot fail on the values it checked. A job whose record is damaged (a counter that is not a
count, a key that is not a hash) is buried in ``dead`` with the reason, never left in no list.

A worker holds a job while its lease names it. After an outage of the queue itself, a worker may
take back a lease that lapsed meanwhile, if the job is still recorded as running on it: nobody
else has taken the job, and the outage was not the job's failure.
"""

from __future__ import annotations

_CHECKS = """
local function check_types(keys, kinds)
  for i, key in ipairs(keys) do
    local kind = redis.call('TYPE', key).ok
    if kind ~= 'none' and kind ~= kinds[i] then
      return redis.error_reply('bertbatch queue key ' .. key .. ' is a ' .. kind .. ', expected a ' .. kinds[i])
    end
  end
  return false
end

-- Why the job's record cannot be updated safely, or false when it can.
local function damage(job)
  local kind = redis.call('TYPE', job).ok
  if kind == 'none' then return 'the job has no record' end
  if kind ~= 'hash' then return 'its record is a ' .. kind .. ', not a hash' end
  for _, name in ipairs({'deliveries', 'failed_attempts'}) do
    local value = redis.call('HGET', job, name)
    if value and not string.match(value, '^%d+$') then
      return name .. ' is ' .. string.format('%q', value) .. ', not a count'
    end
  end
  return false
end

local function count(job, name)
  return tonumber(redis.call('HGET', job, name) or '0')
end

local function holds(lease, worker)
  return redis.call('GET', lease) == worker
end

local function bury(job, id, dead, now, why)
  if redis.call('TYPE', job).ok == 'hash' then
    redis.call('HSET', job, 'state', 'dead', 'worker', '', 'error', why, 'finished_at', now, 'updated_at', now)
  end
  redis.call('LPUSH', dead, id)
end

-- A failed attempt (an error, or a lease that expired): retry at the back of the queue, or bury.
local function after_failure(prefix, id, now, err, max_attempts, pending, dead)
  local job = prefix .. 'job:' .. id
  local damaged = damage(job)
  if damaged then
    bury(job, id, dead, now, err .. '; not retried: ' .. damaged)
    return 'dead'
  end
  local failed = count(job, 'failed_attempts') + 1
  redis.call('HSET', job, 'failed_attempts', failed)
  if failed >= tonumber(max_attempts) then
    bury(job, id, dead, now, err)
    return 'dead'
  end
  redis.call('HSET', job, 'state', 'queued', 'worker', '', 'error', err, 'updated_at', now)
  redis.call('LPUSH', pending, id)
  return 'queued'
end
"""

# KEYS: pending, processing, delayed, dead. ARGV: prefix, worker, lease ms, now.
# BLMOVE cannot also create the lease, and a job in `processing` without a lease looks dead to a
# reaper: so the move and the lease are one script, and an idle worker polls it. Jobs whose
# back-off is over join the back of the queue first.
CLAIM = _CHECKS + """
local bad = check_types(KEYS, {'list', 'list', 'zset', 'list'})
if bad then return bad end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[4])) do
  redis.call('ZREM', KEYS[3], id)
  redis.call('LPUSH', KEYS[1], id)
end
while true do
  local id = redis.call('LINDEX', KEYS[1], -1)
  if not id then return false end
  local job = ARGV[1] .. 'job:' .. id
  local damaged = damage(job)
  if not damaged then
    redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
    redis.call('SET', ARGV[1] .. 'lease:' .. id, ARGV[2], 'PX', ARGV[3])
    local deliveries = count(job, 'deliveries') + 1
    redis.call('HSET', job, 'state', 'running', 'worker', ARGV[2], 'started_at', ARGV[4], 'updated_at', ARGV[4],
               'rows_done', 0, 'rows_to_do', 0, 'deliveries', deliveries)
    return {id, redis.call('HGET', job, 'spec') or '', deliveries}
  end
  redis.call('RPOP', KEYS[1])
  bury(job, id, KEYS[4], ARGV[4], 'not run: ' .. damaged)
end
"""

# KEYS: lease, job. ARGV: worker, lease ms, now, take back (1 or 0), progress field/value pairs.
# 1: renewed; 0: another worker has the job (or it was reaped); -1: the queue has no record of it.
# "Take back": after an outage of the queue, a lease that lapsed while the job is still recorded as
# running on this worker is renewed (nobody else has taken the job).
HEARTBEAT = _CHECKS + """
local kind = redis.call('TYPE', KEYS[2]).ok
if kind == 'none' then return -1 end
if kind ~= 'hash' then return 0 end
local holder = redis.call('GET', KEYS[1])
if holder ~= ARGV[1] then
  if holder or ARGV[4] ~= '1' or redis.call('HGET', KEYS[2], 'state') ~= 'running'
     or redis.call('HGET', KEYS[2], 'worker') ~= ARGV[1] then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], 'updated_at', ARGV[3], unpack(ARGV, 5))
return 1
"""

# KEYS: lease, job, processing. ARGV: worker, id, now, summary, seconds kept.
COMPLETE = _CHECKS + """
local bad = check_types({KEYS[2], KEYS[3]}, {'hash', 'list'})
if bad then return bad end
if not holds(KEYS[1], ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('LREM', KEYS[3], 1, ARGV[2])
redis.call('HSET', KEYS[2], 'state', 'done', 'worker', ARGV[1], 'summary', ARGV[4], 'finished_at', ARGV[3], 'updated_at', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 1
"""

# KEYS: lease, job, processing, pending, dead. ARGV: worker, id, prefix, now, error, max attempts.
FAIL = _CHECKS + """
local bad = check_types({KEYS[3], KEYS[4], KEYS[5]}, {'list', 'list', 'list'})
if bad then return bad end
if not holds(KEYS[1], ARGV[1]) then return false end
redis.call('DEL', KEYS[1])
redis.call('LREM', KEYS[3], 1, ARGV[2])
return after_failure(ARGV[3], ARGV[2], ARGV[4], ARGV[5], ARGV[6], KEYS[4], KEYS[5])
"""

# KEYS: lease, job, processing, pending. ARGV: worker, id, now, note.
# Back to the front of the queue without counting an attempt (a worker stopping).
RELEASE = _CHECKS + """
local bad = check_types({KEYS[2], KEYS[3], KEYS[4]}, {'hash', 'list', 'list'})
if bad then return bad end
if not holds(KEYS[1], ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('LREM', KEYS[3], 1, ARGV[2])
redis.call('HSET', KEYS[2], 'state', 'queued', 'worker', '', 'note', ARGV[4], 'updated_at', ARGV[3])
redis.call('RPUSH', KEYS[4], ARGV[2])
return 1
"""

# KEYS: lease, job, processing, delayed. ARGV: worker, id, now, note, first delay, longest delay (seconds).
# A locked output: back in the queue after a delay that doubles with every locked delivery, behind
# the jobs waiting by then, without counting an attempt. Returns the delay, or false.
BACK_OFF = _CHECKS + """
local bad = check_types({KEYS[2], KEYS[3], KEYS[4]}, {'hash', 'list', 'zset'})
if bad then return bad end
if not holds(KEYS[1], ARGV[1]) then return false end
local locked = (tonumber(redis.call('HGET', KEYS[2], 'locked_deliveries') or '') or 0) + 1
local delay = math.min(tonumber(ARGV[6]), tonumber(ARGV[5]) * 2 ^ math.min(locked - 1, 30))
local due = tonumber(ARGV[3]) + delay
redis.call('DEL', KEYS[1])
redis.call('LREM', KEYS[3], 1, ARGV[2])
redis.call('HSET', KEYS[2], 'state', 'queued', 'worker', '', 'note', ARGV[4], 'updated_at', ARGV[3],
           'locked_deliveries', locked, 'retry_at', string.format('%.3f', due))
redis.call('ZADD', KEYS[4], due, ARGV[2])
return tostring(delay)
"""

# KEYS: processing, pending, dead. ARGV: prefix, now, max attempts.
REAP = _CHECKS + """
local bad = check_types(KEYS, {'list', 'list', 'list'})
if bad then return bad end
local reaped = {}
for _, id in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if redis.call('EXISTS', ARGV[1] .. 'lease:' .. id) == 0 then
    local job = ARGV[1] .. 'job:' .. id
    local worker = '?'
    if redis.call('TYPE', job).ok == 'hash' then worker = redis.call('HGET', job, 'worker') or '?' end
    redis.call('LREM', KEYS[1], 1, id)
    local err = 'worker ' .. worker .. ' stopped renewing its lease (it died, hung or lost the queue)'
    table.insert(reaped, id)
    table.insert(reaped, after_failure(ARGV[1], id, ARGV[2], err, ARGV[3], KEYS[2], KEYS[3]))
  end
end
return reaped
"""
