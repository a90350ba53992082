#!/bin/sh
# A stand-in for a coding agent, run by `bin/orchestrator agent -- examples/agents/fake-coding-agent.sh`.
# It reads the task from the environment, "writes code" in its working directory (the
# task's git worktree when the agent runs with --repo), commits it, and reports a result.
# Replace it with Claude Code or Codex: see README.md beside it.
set -eu

# The prompt: payload.prompt when there is one, else the task type.
prompt=$(printf '%s' "$TASK_PAYLOAD" | sed -n 's/.*"prompt":"\([^"]*\)".*/\1/p')
[ -n "$prompt" ] || prompt="$TASK_TYPE"
echo "task $TASK_ID (attempt $TASK_ATTEMPT) of ticket $TICKET_ID: $prompt"
if [ -n "${TASK_FEEDBACK:-}" ]; then
  echo "it came back with feedback: $TASK_FEEDBACK"
fi

# The "work": one file per task, appended to on rework.
mkdir -p notes
printf '%s\n' "- $TASK_TYPE (attempt $TASK_ATTEMPT): $prompt" >> "notes/$TICKET_ID.md"
sleep 1

commit=""
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git add notes
  git -c user.name="${GIT_AUTHOR_NAME:-orchestrator agent}" \
      -c user.email="${GIT_AUTHOR_EMAIL:-agent@localhost}" \
      commit -q -m "$TASK_TYPE: $prompt" -m "Task $TASK_ID, attempt $TASK_ATTEMPT"
  commit=$(git rev-parse HEAD)
  echo "committed $commit on $(git branch --show-current)"
else
  echo "not in a git worktree (run the agent with --repo DIR to get one): nothing committed" >&2
fi

# What COMPLETE carries: any JSON, at most 1 MiB.
printf '{"summary":"wrote notes/%s.md","commit":"%s"}\n' "$TICKET_ID" "$commit" > "$TASK_RESULT_FILE"
