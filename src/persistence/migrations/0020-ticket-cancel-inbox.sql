-- The ticket_cancel reaction no longer keeps inbox rows: its policy cancels only the tasks
-- still open, so a repeat changes nothing without one. The rows earlier versions wrote (one
-- per cancelled ticket, never deleted) serve nothing now; the inbox stays for a reaction
-- whose effect is not idempotent by itself. A process of the previous version still running
-- during a rolling upgrade no longer finds them either, which is harmless for the same reason.
delete from inbox where consumer = 'ticket_cancel';
