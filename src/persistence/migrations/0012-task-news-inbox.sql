-- The task_state reaction no longer keeps inbox rows: its policy tells a ticket only news
-- newer than the ticket's ticket_tasks row, so a repeat changes nothing without one. The rows
-- earlier versions wrote (one per task event, never deleted) serve nothing now. A process of
-- the previous version still running during a rolling upgrade no longer finds them either,
-- which is harmless for the same reason.
delete from inbox where consumer = 'task_state';
